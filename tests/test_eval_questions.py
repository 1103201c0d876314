"""Question / answer / ground-truth jsonl formats."""

import pytest

from llava_train.eval.questions import (
    Question,
    load_answers,
    load_ground_truth,
    load_questions,
    make_answer_record,
    write_jsonl,
)


def test_questions_round_trip_and_optional_fields(tmp_path):
    write_jsonl(
        [
            {"question_id": 7, "image": "a.png", "text": "What digit?", "category": "digits"},
            {"question_id": "q8", "text": "Text only?"},
        ],
        tmp_path / "q.jsonl",
    )
    qs = load_questions(tmp_path / "q.jsonl")
    assert qs == [Question(7, "What digit?", "a.png", "digits"), Question("q8", "Text only?", None, None)]


def test_answer_record_has_the_original_keys():
    rec = make_answer_record(Question(1, "q?"), prompt="USER: q? ASSISTANT:", text="7", model_id="m")
    assert set(rec) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert rec["question_id"] == 1 and rec["metadata"] == {}
    assert (
        len(rec["answer_id"]) == 22
        and rec["answer_id"] != make_answer_record(Question(1, "q?"), "", "", "m")["answer_id"]
    )


def test_bad_files_fail_with_the_location(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_questions(tmp_path / "bad.jsonl")
    write_jsonl([{"question_id": 1}], tmp_path / "nokey.jsonl")
    with pytest.raises(ValueError, match="lacks \\['text'\\]"):
        load_questions(tmp_path / "nokey.jsonl")
    write_jsonl([{"question_id": 1, "text": "a"}, {"question_id": "1", "text": "b"}], tmp_path / "dup.jsonl")
    with pytest.raises(ValueError, match="duplicate"):
        load_answers(tmp_path / "dup.jsonl")
    write_jsonl([{"question_id": 1, "answer": []}], tmp_path / "gt.jsonl")
    with pytest.raises(ValueError, match="non-empty list"):
        load_ground_truth(tmp_path / "gt.jsonl")
