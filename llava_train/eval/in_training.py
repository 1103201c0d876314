"""Held-out evaluation during training: a TrainerCallback that generates answers every ``eval.eval_steps``.

Each ``eval_steps`` optimizer steps (and after the last step), every rank answers its slice of the
question file (``questions[rank::world]``, batched greedy generation as launch/eval.py), the slices are
gathered, and rank 0 writes ``<run_dir>/eval/answers-step<N>.jsonl``, scores it against the ground truth
(``llava_train.eval.metrics.score``) and appends ``{"step", "metric", "overall", "per_category"}`` to
``<run_dir>/eval_metrics.jsonl``. The overall numbers are logged through the Trainer's ``log`` as
``eval_<name>`` (wandb shows them as ``eval/<name>``) on every rank, with ``eval_score`` the headline
number that loss_curve.png marks.

Under ZeRO-3 (and FSDP) each forward gathers the sharded weights collectively, so every rank must run the same
number of generate calls and steps: the slices are padded to the same length and generation runs with
``synced_gpus``; a question file that mixes image and text-only questions is refused there (the vision
tower would run on some ranks only).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from llava_train.eval.generate import dist_rank_world, generate_answers
from llava_train.eval.questions import Question, load_ground_truth, load_questions, write_jsonl

logger = logging.getLogger(__name__)

# Overall key quoted as the headline score of each metric (the mark on the loss curve).
HEADLINE = {"pope": "f1", "mme": "total"}


def headline(metric: str, overall: dict) -> float | None:
    value = overall.get(HEADLINE.get(metric, "accuracy"))
    return float(value) if isinstance(value, (int, float)) else None


class InTrainingEval(TrainerCallback):
    """Generate, gather, score and log a held-out question file every ``eval_steps`` steps."""

    def __init__(
        self,
        questions: list[Question],
        ground_truth: str,
        *,
        tokenizer: Any,
        image_processor: Any,
        template: str,
        image_folder: str | None,
        run_dir: str | Path,
        log_fn: Callable[[dict], None],
        eval_steps: int,
        batch_size: int = 8,
        max_new_tokens: int = 64,
        metric: str = "auto",
        sharded_weights: bool = False,
    ):
        if eval_steps < 1:
            raise ValueError(f"eval.eval_steps must be >= 1, got {eval_steps}")
        if not questions:
            raise ValueError("the in-training eval question file is empty")
        with_image = {q.image is not None for q in questions}
        if sharded_weights and len(with_image) > 1:
            raise ValueError(
                "under ZeRO-3 / FSDP the in-training eval questions must all have an image or all have none "
                "(the vision tower's sharded weights are gathered by every rank together); split the file"
            )
        self.questions, self.ground_truth, self.metric = questions, ground_truth, metric
        self.tokenizer, self.image_processor, self.template = tokenizer, image_processor, template
        self.image_folder, self.run_dir, self.log_fn = image_folder, Path(run_dir), log_fn
        self.eval_steps, self.batch_size, self.max_new_tokens = eval_steps, batch_size, max_new_tokens
        self.sharded_weights = sharded_weights
        self.done_steps: set[int] = set()
        self.answered_here = 0  # questions this rank generated at the last evaluation (its slice)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.eval_steps == 0 or step == state.max_steps:
            # Trainer.log clears control.should_log: keep the flag so this step's loss is still logged.
            should_log = control.should_log
            self.evaluate(model, step, is_main=state.is_world_process_zero)
            control.should_log = should_log

    def evaluate(self, model: Any, step: int, is_main: bool = True) -> dict | None:
        """Answer, gather, score (rank 0), log (every rank); returns the scores (None: already done)."""
        if step in self.done_steps:
            return None
        self.done_steps.add(step)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA stays applied
        was_training = model.training
        start = time.perf_counter()
        try:
            records = self._answer(model)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        result = self._score(records, step, seconds) if is_main else None
        result = _broadcast(result)
        logs = {f"eval_{k}": float(v) for k, v in result["overall"].items() if isinstance(v, (int, float))}
        score = headline(result["metric"], result["overall"])
        if score is not None:
            logs["eval_score"] = score
        logs["eval_seconds"] = result["seconds"]  # rank 0's: every rank logs the same numbers
        self.log_fn(logs)
        return result

    def _answer(self, model: Any) -> list[dict]:
        rank, world = dist_rank_world()
        part = self.questions[rank::world]
        n_pad = 0
        if self.sharded_weights and world > 1:  # equal slices: every rank runs the same generate calls
            n_pad = math.ceil(len(self.questions) / world) - len(part)
            part = part + [part[-1] if part else self.questions[0]] * n_pad
        sync = {"synced_gpus": True} if self.sharded_weights and world > 1 else None
        # One generate call per batch, each under its own gather (the LLM's forward re-partitions its loose
        # parameters); under ZeRO-3 every rank runs the same number of calls.
        order = sorted(range(len(part)), key=lambda i: len(part[i].text))
        by_index = {}
        for first in range(0, len(order), self.batch_size):
            idx = order[first : first + self.batch_size]
            with _gather_loose_parameters(model):
                batch = generate_answers(
                    model,
                    self.tokenizer,
                    self.image_processor,
                    [part[i] for i in idx],
                    template=self.template,
                    batch_size=len(idx),
                    max_new_tokens=self.max_new_tokens,
                    image_folder=self.image_folder,
                    model_id="in-training",
                    generate_kwargs=sync,
                )
            by_index.update(zip(idx, batch))
        records = [by_index[i] for i in range(len(part))]
        records = records[: len(records) - n_pad]
        self.answered_here = len(records)
        if world == 1:
            return records
        gathered: list[list[dict]] = [[] for _ in range(world)]
        torch.distributed.all_gather_object(gathered, records)
        by_id = {str(r["question_id"]): r for part_records in gathered for r in part_records}
        return [by_id[str(q.question_id)] for q in self.questions]

    def _score(self, records: list[dict], step: int, seconds: float) -> dict:
        from llava_train.eval.metrics import score

        answers = self.run_dir / "eval" / f"answers-step{step}.jsonl"
        write_jsonl(records, answers)
        scores = score(answers, self.ground_truth, self.metric)
        result = {"step": step, **scores, "seconds": round(seconds, 3), "answers_file": str(answers)}
        with open(self.run_dir / "eval_metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(result) + "\n")
        logger.info("step %d held-out %s: %s", step, scores["metric"], scores["overall"])
        return result


def build_in_training_eval(
    cfg: Any, model: Any, tokenizer: Any, log_fn: Callable[[dict], None]
) -> InTrainingEval:
    """The callback of ``cfg.eval`` (its questions checked now, not at the first eval hours later)."""
    from llava_train.eval.metrics import METRICS
    from llava_train.train.steps import is_zero3

    e = cfg.eval
    if e.metric not in METRICS:
        raise ValueError(f"eval.metric={e.metric!r}: choose one of {METRICS}")
    for name, path in (("eval.data_path", e.data_path), ("eval.ground_truth", e.ground_truth)):
        if not path or not Path(path).is_file():
            raise FileNotFoundError(
                f"{name}={path!r} is not a file: eval=vqa needs a question jsonl (eval.data_path) and its "
                "ground truth (eval.ground_truth), formats in llava_train/eval/questions.py"
            )
    questions = load_questions(e.data_path)
    truth = load_ground_truth(e.ground_truth)
    unanswerable = [q.question_id for q in questions if str(q.question_id) not in truth]
    if unanswerable or len(truth) != len(questions):
        raise ValueError(
            f"eval.ground_truth={e.ground_truth} does not cover eval.data_path={e.data_path} one to one "
            f"({len(truth)} answers, {len(questions)} questions; without an answer: {unanswerable[:5]}): "
            "use the ground truth of this question file"
        )
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return InTrainingEval(
        questions,
        e.ground_truth,
        tokenizer=tokenizer,
        image_processor=base.get_vision_tower().image_processor(),
        template=cfg.data.template,
        image_folder=e.image_folder or cfg.data.image_folder,
        run_dir=cfg.training.run_dir,
        log_fn=log_fn,
        eval_steps=e.eval_steps,
        batch_size=e.per_device_batch_size,
        max_new_tokens=e.max_new_tokens,
        metric=e.metric,
        sharded_weights=is_zero3(cfg) or cfg.fsdp.enabled,
    )


def _gather_loose_parameters(model: Any) -> Any:
    """Under ZeRO-3, gather the parameters held directly by the model and its LLM (image_newline): the
    multimodal merge of ``generate`` reads them before any forward of their module, where ZeRO-3 leaves
    them partitioned (empty). A no-op otherwise."""
    owners = [model, *([model.get_model()] if hasattr(model, "get_model") else [])]
    loose = [p for m in owners for p in m.parameters(recurse=False) if getattr(p, "ds_id", None) is not None]
    if not loose:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(loose)


def _broadcast(result: dict | None) -> dict:
    """Rank 0's result on every rank (a no-op in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return result
    box = [result]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
