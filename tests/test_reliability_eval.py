"""Evaluation on bad question files (issue 19, items 2 and 6): image paths cannot leave image_folder, a bad
question names its question_id, answers are kept as they come and a rerun answers only the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_eval_run import N_QUESTIONS, _paths, workdir  # noqa: F401  (workdir is a fixture)

from llava_train.eval import generate
from llava_train.eval.generate import BadQuestionError, read_progress, shard_path
from llava_train.eval.questions import read_jsonl, write_jsonl
from llava_train.eval.run import run_eval


def _questions(root: Path, name: str, bad: dict[int, str | None]) -> str:
    """The workdir's questions with the images of ids in `bad` replaced."""
    records = read_jsonl(root / "questions.jsonl")
    for rec in records:
        if rec["question_id"] in bad:
            rec["image"] = bad[rec["question_id"]]
    write_jsonl(records, root / name)
    return str(root / name)


@pytest.mark.parametrize("where", ["../outside.png", "absolute"])
def test_eval_refuses_an_image_path_outside_the_image_folder(workdir, where):  # noqa: F811
    secret = workdir / "outside.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(secret)
    path = str(secret) if where == "absolute" else where
    kwargs = {
        **_paths(workdir, f"escape_{where[:3]}"),
        "template": "chatml",
        "max_new_tokens": 4,
        "batch_size": 2,
    }
    kwargs["question_file"] = _questions(workdir, f"q_escape_{where[:3]}.jsonl", {3: path})
    with pytest.raises(BadQuestionError, match="question_id 3: .*path_escapes_root"):
        run_eval(**kwargs)


def test_a_bad_question_keeps_the_answers_so_far_and_a_rerun_answers_only_the_rest(workdir, monkeypatch):  # noqa: F811
    kwargs = {**_paths(workdir, "resume"), "template": "chatml", "max_new_tokens": 4, "batch_size": 1}
    kwargs["question_file"] = _questions(workdir, "q_missing.jsonl", {4: "no_such.png"})
    with pytest.raises(BadQuestionError, match="question_id 4: .*missing_image"):
        run_eval(**kwargs)
    progress = shard_path(kwargs["answers_file"], 0)
    kept = read_progress(progress)
    assert kept and "4" not in kept  # answered before the bad one, written as they came
    with open(progress, "a") as f:
        f.write('{"question_id": 99, "te')  # a kill mid-write: a torn last line

    asked = []
    real = generate.generate_batch

    def counting(model, tokenizer, processor, batch, *args, **kw):
        asked.extend(q.question_id for q in batch)
        return real(model, tokenizer, processor, batch, *args, **kw)

    monkeypatch.setattr(generate, "generate_batch", counting)
    kwargs["question_file"] = str(workdir / "questions.jsonl")  # the question file fixed
    metrics = run_eval(**kwargs)
    assert sorted(asked) == sorted(set(range(N_QUESTIONS)) - {int(q) for q in kept})
    answers = {str(r["question_id"]): r for r in read_jsonl(kwargs["answers_file"])}
    assert len(answers) == N_QUESTIONS and metrics["n_skipped"] == 0
    assert all(answers[q]["answer_id"] == kept[q]["answer_id"] for q in kept)  # reused, not regenerated
    assert not progress.exists()


def test_skip_policy_counts_a_bad_question_and_scores_it_as_wrong(workdir):  # noqa: F811
    kwargs = {
        **_paths(workdir, "skip"),
        "template": "chatml",
        "max_new_tokens": 4,
        "batch_size": 3,
        "bad_record_policy": "skip",
    }
    kwargs["question_file"] = _questions(workdir, "q_skip.jsonl", {2: "no_such.png"})
    metrics = run_eval(**kwargs)
    assert metrics["n_skipped"] == 1 and metrics["skipped_question_ids"] == [2]
    answers = {r["question_id"]: r for r in read_jsonl(kwargs["answers_file"])}
    assert len(answers) == N_QUESTIONS and answers[2]["text"] == ""
    assert "missing_image" in answers[2]["metadata"]["skipped"]
    assert json.loads(Path(kwargs["answers_file"]).with_suffix(".metrics.json").read_text())["n_skipped"] == 1
