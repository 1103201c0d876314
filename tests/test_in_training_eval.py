"""eval=vqa: held-out generation every eval.eval_steps during training, scored, logged and plotted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_utils import compose_config, make_colour_dataset, run_steps, tiny_overrides
from transformers import TrainerCallback

from llava_train.config import to_typed
from llava_train.eval.generate import generate_answers
from llava_train.eval.in_training import InTrainingEval, build_in_training_eval, headline
from llava_train.eval.metrics import score
from llava_train.eval.questions import load_questions, read_jsonl, write_jsonl

N_QUESTIONS = 3


class TrainingModes(TrainerCallback):
    """model.training at the start of each step (keyed by the steps done before it)."""

    def __init__(self):
        self.at_step_begin: dict[int, bool] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at_step_begin[state.global_step] = model.training


def eval_files(folder: Path, with_text_only: bool = False) -> tuple[Path, Path]:
    """A held-out question jsonl over the colour images and yes/no ground truth: POPE's parse reads an
    answer without "no" / "not" as yes, so an untrained model scores neither 0 nor 1."""
    images = [r["image"] for r in json.loads((folder / "train.json").read_text()) if "image" in r]
    questions = [
        {"question_id": f"q{i}", "image": image, "text": "Is this image red?"}
        for i, image in enumerate(images[:N_QUESTIONS])
    ]
    if with_text_only:
        questions.append({"question_id": "t", "text": "Is red a colour?"})
    truth = [
        {"question_id": q["question_id"], "answer": "no" if i == 1 else "yes"}
        for i, q in enumerate(questions)
    ]
    write_jsonl(questions, folder / "eval_q.jsonl")
    write_jsonl(truth, folder / "eval_gt.jsonl")
    return folder / "eval_q.jsonl", folder / "eval_gt.jsonl"


def eval_overrides(questions: Path, truth: Path, **extra) -> list[str]:
    base = {"eval_steps": 2, "per_device_batch_size": 3, "max_new_tokens": 3}
    base.update(extra)
    return ["eval=vqa", f"eval.data_path={questions}", f"eval.ground_truth={truth}"] + [
        f"eval.{k}={v}" for k, v in base.items()
    ]


@pytest.fixture(scope="module")
def data_json(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=16)


def test_eval_every_two_steps_logged_and_plotted(data_json, tmp_path):
    questions, truth = eval_files(data_json.parent)
    run_dir = tmp_path / "run"
    overrides = [
        "stage=finetune",
        "stage.pretrain_mm_mlp_adapter=null",
        *tiny_overrides(
            data_json,
            run_dir,
            max_steps=4,
            save_steps=100,
            loss_plot="true",
            global_batch_size=2,
            per_device_batch_size=2,
        ),
        *eval_overrides(questions, truth),
    ]
    modes = TrainingModes()
    trainer, model, _ = run_steps(compose_config(overrides), callbacks=[modes])
    assert modes.at_step_begin == {0: True, 1: True, 2: True, 3: True}  # train mode again after each eval

    lines = [json.loads(x) for x in (run_dir / "eval_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    for line in lines:
        answers = read_jsonl(line["answers_file"])
        assert [a["question_id"] for a in answers] == [f"q{i}" for i in range(N_QUESTIONS)]
        assert (
            line["overall"] == score(line["answers_file"], truth)["overall"]
        )  # what was logged is the score
    logged = {h["step"]: h for h in trainer.state.log_history if "eval_score" in h}
    assert sorted(logged) == [2, 4]
    assert logged[4]["eval_score"] == headline(lines[1]["metric"], lines[1]["overall"])
    assert logged[4]["eval_n"] == N_QUESTIONS and lines[1]["metric"] == "yesno"
    assert 0 < logged[4]["eval_score"] < 1 and "eval_tp" in logged[4]
    assert {h["step"] for h in trainer.state.log_history if "loss" in h} == {1, 2, 3, 4}  # training went on
    assert (run_dir / "loss_curve.png").stat().st_size > 0

    # Step 4 is the last step: its answers are the final model's.
    cfg = to_typed(compose_config(overrides))
    callback = build_in_training_eval(cfg, trainer.model, trainer.processing_class, log_fn=lambda logs: None)
    again = generate_answers(
        trainer.model,
        trainer.processing_class,
        callback.image_processor,
        load_questions(questions),
        template=cfg.data.template,
        batch_size=3,
        max_new_tokens=3,
        image_folder=str(data_json.parent),
    )
    assert [a["text"] for a in again] == [a["text"] for a in read_jsonl(lines[1]["answers_file"])]


def test_eval_config_errors_name_the_fix(data_json, tmp_path):
    questions, truth = eval_files(data_json.parent)
    base = [
        "stage=finetune",
        "stage.pretrain_mm_mlp_adapter=null",
        *tiny_overrides(data_json, tmp_path / "r"),
    ]
    with pytest.raises(ValueError, match="must be positive"):
        to_typed(compose_config([*base, *eval_overrides(questions, truth, eval_steps=0)]))
    cfg = to_typed(compose_config([*base, *eval_overrides(questions, tmp_path / "missing.jsonl")]))
    with pytest.raises(FileNotFoundError, match="eval.ground_truth"):
        build_in_training_eval(cfg, None, None, log_fn=print)
    cfg = to_typed(compose_config([*base, *eval_overrides(questions, truth, metric="bleu")]))
    with pytest.raises(ValueError, match="eval.metric='bleu'"):
        build_in_training_eval(cfg, None, None, log_fn=print)
    mixed = load_questions(eval_files(data_json.parent, with_text_only=True)[0])
    kwargs = dict(
        tokenizer=None, image_processor=None, template="chatml", image_folder=None, run_dir=tmp_path
    )
    InTrainingEval(mixed, str(truth), **kwargs, log_fn=print, eval_steps=2)  # replicated weights: fine
    with pytest.raises(ValueError, match="all have an image or all have none"):
        InTrainingEval(mixed, str(truth), **kwargs, log_fn=print, eval_steps=2, sharded_weights=True)
    questions, truth = eval_files(data_json.parent)
    write_jsonl(read_jsonl(truth)[:-1], tmp_path / "short.jsonl")
    cfg = to_typed(compose_config([*base, *eval_overrides(questions, tmp_path / "short.jsonl")]))
    with pytest.raises(ValueError, match="one to one"):
        build_in_training_eval(cfg, None, None, log_fn=print)


@pytest.mark.distributed
@pytest.mark.parametrize(("zero", "stage"), [("zero2", "finetune_lora"), ("zero3", "finetune")])
def test_two_process_deepspeed_eval_is_sharded_and_gathered(data_json, tmp_path, zero, stage):
    """Each rank answers its slice (3 questions: 2 + 1) one question a batch; under ZeRO-3 rank 1's slice is
    padded to 2, else rank 0's second generate call would wait forever for rank 1's weight gathers."""
    import os
    import subprocess

    from train_utils import torchrun

    questions, truth = eval_files(data_json.parent)
    run_dir = tmp_path / "run"
    overrides = [
        f"+stage={stage}",
        f"deepspeed={zero}",
        "stage.pretrain_mm_mlp_adapter=null",
        "stage.lora.r=8",
        *tiny_overrides(data_json, run_dir, max_steps=4, save_steps=100, global_batch_size=4),
        "training.per_device_batch_size=2",
        *eval_overrides(questions, truth, per_device_batch_size=1),
    ]
    driver = Path(__file__).resolve().parent / "distributed_driver.py"
    repo = str(Path(__file__).resolve().parent.parent)  # this checkout's llava_train, not an installed one
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    proc = subprocess.run(
        [*torchrun(2), str(driver), *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2
    lines = [json.loads(x) for x in (run_dir / "eval_metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4]
    for line in lines:
        answers = read_jsonl(line["answers_file"])
        assert [a["question_id"] for a in answers] == [f"q{i}" for i in range(N_QUESTIONS)]
        assert line["overall"] == score(line["answers_file"], truth)["overall"]
    # Both ranks logged rank 0's scores; the slices were 2 and 1 questions.
    assert ranks[0]["eval_logs"] == ranks[1]["eval_logs"] and len(ranks[0]["eval_logs"]) == 2
    assert [r["eval_answered"] for r in ranks] == [2, 1]
