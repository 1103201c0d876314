"""End to end: a saved tiny model evaluated by run_eval, by launch/eval.py, and by two torchrun ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import torchrun

from llava_train.data import load_tokenizer
from llava_train.eval.metrics import score
from llava_train.eval.normalize import normalize_textvqa_answer
from llava_train.eval.questions import read_jsonl, write_jsonl
from llava_train.eval.run import load_eval_model, resolve_template, run_eval
from llava_train.model import ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent
N_QUESTIONS = 7


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model (with tokenizer and a run config.yaml), images, questions and yes/no ground truth."""
    root = tmp_path_factory.mktemp("eval_run")
    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "model" / "config.yaml").write_text("data:\n  template: chatml\n")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for i, size in enumerate([(40, 30), (56, 56), (30, 60)]):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png"
        )
    questions = [
        {"question_id": i, "image": f"{i % 3}.png" if i != 5 else None, "text": f"Is there a digit {i}?"}
        for i in range(N_QUESTIONS)
    ]
    write_jsonl(questions, root / "questions.jsonl")
    truth = [
        {"question_id": i, "answer": "yes" if i % 2 else "no", "category": f"c{i % 2}"}
        for i in range(N_QUESTIONS)
    ]
    write_jsonl(truth, root / "gt.jsonl")
    return root


def _paths(root: Path, out: str) -> dict:
    return dict(
        model_dir=str(root / "model"),
        question_file=str(root / "questions.jsonl"),
        image_folder=str(root / "images"),
        answers_file=str(root / out / "answers.jsonl"),
        ground_truth=str(root / "gt.jsonl"),
    )


def test_run_eval_writes_answers_and_metrics(workdir):
    p = _paths(workdir, "lib")
    metrics = run_eval(**p, template=None, batch_size=3, max_new_tokens=4)  # template from config.yaml
    answers = read_jsonl(p["answers_file"])
    assert [a["question_id"] for a in answers] == list(range(N_QUESTIONS))
    assert metrics["template"] == "chatml" and metrics["metric"] == "yesno"
    assert metrics["overall"] == score(p["answers_file"], p["ground_truth"])["overall"]
    assert sorted(metrics["per_category"]) == ["c0", "c1"]
    on_disk = json.loads((workdir / "lib" / "answers.metrics.json").read_text())
    assert on_disk["overall"] == metrics["overall"] and on_disk["n_questions"] == N_QUESTIONS


def test_missing_template_and_tokenizer_fail_with_the_fix(workdir, tmp_path):
    with pytest.raises(ValueError, match="Pass template="):
        resolve_template(tmp_path, None)
    assert resolve_template(tmp_path, "vicuna_v1") == "vicuna_v1"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pass tokenizer="):
        load_eval_model(tmp_path)


def _run(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_launch_eval_cli(workdir):
    p = _paths(workdir, "cli")
    _run(
        [
            sys.executable,
            str(REPO / "launch" / "eval.py"),
            *(f"{k}={v}" for k, v in p.items()),
            "batch_size=4",
            "max_new_tokens=4",
            f"submission_file={workdir / 'cli' / 'upload.json'}",
        ],
        workdir,
    )
    metrics = json.loads((workdir / "cli" / "answers.metrics.json").read_text())
    assert metrics["overall"]["n"] == N_QUESTIONS and metrics["template"] == "chatml"
    upload = json.loads((workdir / "cli" / "upload.json").read_text())
    answers = read_jsonl(p["answers_file"])
    assert upload == [
        {"question_id": a["question_id"], "answer": normalize_textvqa_answer(a["text"])} for a in answers
    ]
    assert not (workdir / "outputs").exists()  # no Hydra output folder


@pytest.mark.distributed
def test_torchrun_two_ranks_match_one_process(workdir):
    # Batch 1 and one thread everywhere: every question then runs the very same computation in both
    # set-ups, so this checks sharding and merging, bit for bit (batching is checked in test_eval_generate).
    single = _paths(workdir, "one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_eval(**single, batch_size=1, max_new_tokens=4)
    finally:
        torch.set_num_threads(threads)
    p = _paths(workdir, "two")
    args = [*(f"{k}={v}" for k, v in p.items()), "batch_size=1", "max_new_tokens=4", "device=cpu"]
    _run([*torchrun(2), str(REPO / "launch" / "eval.py"), *args], workdir)
    two = read_jsonl(p["answers_file"])
    one = read_jsonl(single["answers_file"])
    assert [a["question_id"] for a in two] == list(range(N_QUESTIONS))
    assert [a["text"] for a in two] == [a["text"] for a in one]
    assert json.loads((workdir / "two" / "answers.metrics.json").read_text())["world_size"] == 2
    assert not list((workdir / "two").glob("*.rank*"))


def test_transformers_native_export_gives_the_same_answers(workdir):
    """launch/export.py's native llava dir is evaluated like the checkpoint it came from."""
    from llava_train.export import export_hf

    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(preset="tiny", image_aspect_ratio="pad", mm_patch_merge_type="flat"), tokenizer
    )
    model.save_pretrained(workdir / "pad_model")
    tokenizer.save_pretrained(workdir / "pad_model")
    export_hf(model, tokenizer, workdir / "native")
    ours = {**_paths(workdir, "ours"), "model_dir": str(workdir / "pad_model")}
    native = {**_paths(workdir, "native_out"), "model_dir": str(workdir / "native")}
    run_eval(**ours, template="chatml", batch_size=4, max_new_tokens=4)
    run_eval(**native, template="chatml", batch_size=4, max_new_tokens=4)
    texts = [a["text"] for a in read_jsonl(ours["answers_file"])]
    assert [a["text"] for a in read_jsonl(native["answers_file"])] == texts
