"""Scorers: VQA soft accuracy, exact match, POPE yes/no, multiple-choice letters, score() on files."""

import pytest

from llava_train.eval.metrics import (
    choice_accuracy,
    detect_metric,
    exact_match,
    extract_choice_letter,
    score,
    vqa_accuracy,
    yes_no,
    yes_no_metrics,
)
from llava_train.eval.questions import write_jsonl


def _humans(n_match: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * n_match + [other] * (10 - n_match)


@pytest.mark.parametrize(
    ("n_match", "expected"),
    # Leave-one-out mean of min(1, matches/3): e.g. 3 matches -> (3 * 2/3 + 7 * 1) / 10 = 0.9.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_leave_one_out(n_match, expected):
    assert vqa_accuracy("2", _humans(n_match)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("Two.", _humans(3, answer="two")) == pytest.approx(0.9)


def test_single_answer_is_exact_match():
    assert vqa_accuracy("The cat", "cat") == 1.0
    assert vqa_accuracy("cat", ["cat"]) == 1.0
    assert vqa_accuracy("cats", "cat") == 0.0
    assert exact_match("Yes.", "yes") == 1.0


def test_vqa_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes, there is a dog.", "yes"),
        ("No, there is not.", "no"),
        ("There is no dog in the image.", "no"),
        ("The dog is not visible", "no"),
        ("no, it is not", "no"),  # the comma is dropped before splitting
        ("Yes. There is no cat.", "yes"),  # only the first sentence counts
        ("Not sure", "yes"),  # "Not" is not one of POPE's words
        ("Nothing", "yes"),  # whole words only
        ("", "yes"),
    ],
)
def test_yes_no_mapping_as_pope(text, label):
    assert yes_no(text) == label


def test_yes_no_metrics_hand_counted():
    preds = ["Yes", "Yes", "No", "Yes", "No", "No"]
    truth = ["yes", "yes", "yes", "no", "no", "no"]  # tp=2 fn=1 fp=1 tn=2
    m = yes_no_metrics(preds, truth)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)
    assert m["n"] == 6


def test_yes_no_metrics_zero_denominators_and_bad_truth():
    m = yes_no_metrics(["no", "no"], ["no", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 1.0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        yes_no_metrics(["yes"], ["maybe"])


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("A", "A"),
        ("(B)", "B"),
        ("C.", "C"),
        ("D)", "D"),
        ("A. cat", "A"),
        ("(B) a dog", "B"),
        ("C: the red one", "C"),
        ("The answer is A", "A"),
        ("The answer is (D).", "D"),
        ("answer is: B", "B"),
        ("Answer: C", "C"),
        ("  B  ", "B"),
        ("a cat", None),  # lower-case "a" is an article
        ("The answer is a cat.", None),
        ("A cat is on the mat", None),
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_choice_letter(text, letter):
    assert extract_choice_letter(text) == letter


def test_extract_choice_letter_respects_option_count():
    assert extract_choice_letter("E", num_options=4) is None
    assert extract_choice_letter("D", num_options=4) == "D"


def test_choice_accuracy_counts_unparsed_as_wrong():
    m = choice_accuracy(["A", "(B) dog", "no idea"], ["A", "C", "B"])
    assert m == {"accuracy": pytest.approx(1 / 3), "unparsed": 1, "n": 3}


def test_detect_metric():
    assert detect_metric(["yes", "No"]) == "yesno"
    assert detect_metric(["A", "C"]) == "mc"
    assert detect_metric(["yes", "2"]) == "vqa"
    assert detect_metric([["yes"] * 10]) == "vqa"


def test_score_files_overall_and_per_category(tmp_path):
    truth = [
        {"question_id": 1, "answer": "yes", "category": "adversarial"},
        {"question_id": 2, "answer": "no", "category": "adversarial"},
        {"question_id": 3, "answer": "yes", "category": "random"},
        {"question_id": 4, "answer": "no", "category": "random"},
    ]
    answers = [
        {"question_id": "1", "text": "Yes, there is."},  # str vs int ids still match
        {"question_id": 2, "text": "Yes."},
        {"question_id": 3, "text": "Yes"},
        {"question_id": 4, "text": "There is no dog."},
    ]
    write_jsonl(truth, tmp_path / "gt.jsonl")
    write_jsonl(answers, tmp_path / "ans.jsonl")
    result = score(tmp_path / "ans.jsonl", tmp_path / "gt.jsonl")
    assert result["metric"] == "yesno"
    assert result["overall"]["accuracy"] == pytest.approx(0.75)
    assert result["per_category"]["adversarial"]["accuracy"] == pytest.approx(0.5)
    assert result["per_category"]["random"]["accuracy"] == pytest.approx(1.0)


def test_score_vqa_lists_and_missing_answers(tmp_path):
    write_jsonl(
        [{"question_id": 1, "answer": _humans(3)}, {"question_id": 2, "answer": "cat", "category": "x"}],
        tmp_path / "gt.jsonl",
    )
    write_jsonl(
        [{"question_id": 1, "text": "two"}, {"question_id": 2, "text": "a cat"}], tmp_path / "a.jsonl"
    )
    result = score(tmp_path / "a.jsonl", tmp_path / "gt.jsonl")
    assert result["metric"] == "vqa"
    assert result["overall"]["accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    assert list(result["per_category"]) == ["x"]
    write_jsonl([{"question_id": 1, "text": "two"}], tmp_path / "short.jsonl")
    with pytest.raises(ValueError, match="1 ground-truth questions have no answer"):
        score(tmp_path / "short.jsonl", tmp_path / "gt.jsonl")
