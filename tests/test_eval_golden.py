"""Our scores against the original scripts' output on one fixture (tests/fixtures/eval_golden/README.md).

golden.json was written by running LLaVA's eval_textvqa.py / m4c_evaluator.py, convert_vqav2_for_submission.py,
eval_pope.py, eval_science_qa.py, ScienceQA's evaluate_acc.py and MME's calculation.py on these files.
"""

import json
from pathlib import Path

import pytest

from llava_train.eval.benchmarks import scienceqa_ground_truth, write_vqav2_submission
from llava_train.eval.metrics import scienceqa_choice_letter, score, textvqa_accuracy
from llava_train.eval.normalize import normalize_textvqa_answer
from llava_train.eval.questions import load_answers, read_jsonl, write_jsonl

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "eval_golden"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text())


def test_textvqa_per_question_and_overall():
    answers = {str(r["question_id"]): r["text"] for r in read_jsonl(FIXTURE / "textvqa_answers.jsonl")}
    truth = {str(r["question_id"]): r["answer"] for r in read_jsonl(FIXTURE / "textvqa_gt.jsonl")}
    golden = GOLDEN["textvqa"]
    ours = {q: textvqa_accuracy(answers[q], truth[q]) for q in truth}
    assert ours == pytest.approx(golden["per_question"], abs=1e-12)
    assert len(set(ours.values())) >= 5  # the fixture spans partial credit, not only 0 / 1
    for text, processed in golden["processor"].items():
        assert normalize_textvqa_answer(text) == processed, text
    result = score(FIXTURE / "textvqa_answers.jsonl", FIXTURE / "textvqa_gt.jsonl", metric="textvqa")
    assert round(100 * result["overall"]["accuracy"], 2) == golden["printed_accuracy_percent"]


def test_vqav2_submission_file(tmp_path):
    out = tmp_path / "upload" / "submission.json"
    written = write_vqav2_submission(
        FIXTURE / "textvqa_answers.jsonl", FIXTURE / "vqav2_test2015_questions.jsonl", out
    )
    assert json.loads(out.read_text()) == written == GOLDEN["vqav2_submission"]


def test_pope_counts_per_category_and_mean():
    result = score(FIXTURE / "pope_answers.jsonl", FIXTURE / "pope_gt.jsonl", metric="pope")
    golden = GOLDEN["pope"]
    assert set(result["per_category"]) == set(golden)
    for category, expected in golden.items():
        got = {k: result["per_category"][category][k] for k in expected}
        assert got == pytest.approx(expected, abs=1e-12), category
    # Papers' "average" row: the mean over the three categories.
    f1s = [g["f1"] for g in golden.values()]
    assert result["mean"]["f1"] == pytest.approx(sum(f1s) / 3)


def test_mme_subtask_scores_and_totals():
    result = score(FIXTURE / "mme_answers.jsonl", FIXTURE / "mme_gt.jsonl", metric="mme")
    golden = GOLDEN["mme"]
    scores = {t: m["score"] for t, m in result["per_category"].items()}
    assert scores == pytest.approx(golden["scores"], abs=1e-9)
    assert result["overall"]["perception"] == pytest.approx(golden["perception"], abs=1e-9)
    assert result["overall"]["cognition"] == pytest.approx(golden["cognition"], abs=1e-9)
    assert result["missing_subtasks"] == []


def test_scienceqa_parse_accuracy_and_columns(tmp_path):
    gt = tmp_path / "sqa_gt.jsonl"
    write_jsonl(scienceqa_ground_truth(FIXTURE / "scienceqa_problems.json"), gt)
    golden = GOLDEN["scienceqa"]
    texts = {q: r["text"] for q, r in load_answers(FIXTURE / "scienceqa_answers.jsonl").items()}
    assert {q: scienceqa_choice_letter(t) or "FAILED" for q, t in texts.items()} == golden["parsed"]
    result = score(FIXTURE / "scienceqa_answers.jsonl", gt, metric="scienceqa")
    assert result["overall"]["accuracy"] * 100 == pytest.approx(golden["accuracy_percent"], abs=1e-9)
    assert round(result["overall"]["img_accuracy"] * 100, 2) == golden["printed"]["img_accuracy"]
    names = {
        "NAT": "acc_natural",
        "SOC": "acc_social",
        "LAN": "acc_language",
        "TXT": "acc_has_text",
        "IMG": "acc_has_image",
        "NO": "acc_no_context",
        "G1-6": "acc_grade_1_6",
        "G7-12": "acc_grade_7_12",
    }
    for ours, theirs in names.items():
        assert (
            round(result["per_category"][ours]["accuracy"] * 100, 2) == golden["columns_percent"][theirs]
        ), ours
    # The lenient forms only add answers the original fails on.
    assert result["overall"]["lenient_accuracy"] > result["overall"]["accuracy"]
