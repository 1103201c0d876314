"""Scorers: VQA / TextVQA soft accuracy, exact match, POPE, MME, ScienceQA, VQAv2 submission, score() on files."""

import pytest

from llava_train.eval.benchmarks import mme_answer, mme_scores, scienceqa_scores, vqav2_submission
from llava_train.eval.metrics import (
    choice_accuracy,
    detect_metric,
    exact_match,
    extract_choice_letter,
    scienceqa_choice_letter,
    score,
    textvqa_accuracy,
    vqa_accuracy,
    yes_no,
    yes_no_metrics,
)
from llava_train.eval.normalize import normalize_textvqa_answer
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


@pytest.mark.parametrize(
    ("text", "strict", "lenient"),
    [
        # eval_science_qa.py's order: a bare letter, then a leading "X. ", then one "The answer is X.".
        ("(B) dog. The answer is A.", "A", "A"),
        ("B) x. The answer is C.", "C", "C"),
        ("B. The answer is A.", "B", "B"),
        ("The answer is A. The answer is B.", None, "A"),  # two matches: FAILED there
        ("The answer is D", None, "D"),  # its pattern needs a character after the letter
        ("(B) dog", None, "B"),
        ("B)", None, "B"),
        (" A", None, "A"),  # the original does not strip
        ("F", None, "F"),  # its options are A-E
        ("AB", None, None),
    ],
)
def test_choice_letter_original_rules_first(text, strict, lenient):
    assert scienceqa_choice_letter(text) == strict
    assert extract_choice_letter(text, strict=True) == strict
    assert extract_choice_letter(text) == lenient


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("John's car", "john 's car"),  # "'s" split off
        ("a,b", "ab"),  # commas removed, not turned into spaces
        ("what?", "what"),
        ("1,000", "1000"),
        ("Two dogs.", "2 dogs"),
        ("The End", "end"),
    ],
)
def test_textvqa_processor(text, expected):
    assert normalize_textvqa_answer(text) == expected


def test_textvqa_accuracy_hand_counted():
    humans = ["john 's car"] * 2 + ["car"] * 8
    # 2 matches: leaving a match out leaves 1 (1/3), leaving another out leaves 2 (2/3): (2/3 + 8 * 2/3) / 10
    assert textvqa_accuracy("John's car", humans) == pytest.approx(0.6)
    assert vqa_accuracy("John's car", humans) == 0.0  # the VQAv2 normalisation keeps "john's"
    with pytest.raises(ValueError, match="list of human answers"):
        textvqa_accuracy("car", "car")


def test_yes_no_metrics_counts():
    m = yes_no_metrics(["Yes", "Yes", "No", "Yes", "No", "No"], ["yes", "yes", "yes", "no", "no", "no"])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Nope", "no"),
        ("maybe yes", "other"),
        ("I think yes", "other"),
        ("yes, no", "yes"),
    ],
)
def test_mme_answer_parse(text, label):
    assert mme_answer(text) == label


def test_mme_acc_plus_pairs_an_images_questions():
    truth = {
        "1": {"answer": "Yes", "category": "color", "image": "a.jpg"},
        "2": {"answer": "No", "category": "color", "image": "a.jpg"},
        "3": {"answer": "Yes", "category": "color", "image": "b.jpg"},
        "4": {"answer": "No", "category": "color", "image": "b.jpg"},
    }
    answers = {q: {"text": t} for q, t in zip("1234", ["Yes", "No", "Yes", "Yes"])}
    result = mme_scores(answers, truth)
    color = result["per_category"]["color"]
    assert (color["acc"], color["acc_plus"], color["score"]) == (0.75, 0.5, 125.0)
    assert result["overall"]["perception"] == 125.0 and result["overall"]["cognition"] == 0.0
    assert "existence" in result["missing_subtasks"]


def test_scienceqa_columns_hand_counted():
    truth = {
        "1": {
            "answer": "A",
            "choices": 2,
            "subject": "natural science",
            "hint": "",
            "image": None,
            "grade": "grade2",
        },
        "2": {
            "answer": "B",
            "choices": 3,
            "subject": "social science",
            "hint": "h",
            "image": "i.png",
            "grade": "grade8",
        },
        "3": {
            "answer": "C",
            "choices": 3,
            "subject": "social science",
            "hint": "",
            "image": "i.png",
            "grade": "grade9",
        },
    }
    answers = {
        "1": {"text": "A"},
        "2": {"text": "The answer is B.", "prompt": "<image>\nq"},
        "3": {"text": "(C)"},
    }
    result = scienceqa_scores(answers, truth)
    assert result["overall"]["accuracy"] == pytest.approx(2 / 3)
    assert result["overall"]["lenient_accuracy"] == 1.0 and result["overall"]["failed"] == 1
    assert result["overall"]["img_accuracy"] == 1.0  # only question 2's prompt holds <image>
    cols = {c: m["accuracy"] for c, m in result["per_category"].items()}
    assert cols == pytest.approx(
        {"NAT": 1, "SOC": 0.5, "TXT": 1, "IMG": 0.5, "NO": 1, "G1-6": 1, "G7-12": 0.5}
    )


def test_vqav2_submission_missing_and_normalised():
    answers = {"1": {"text": "Two dogs."}, "3": {"text": "John's"}}
    assert vqav2_submission(answers, [1, 2, 3]) == [
        {"question_id": 1, "answer": "2 dogs"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "john 's"},
    ]
