"""Fault tolerance for training runs: pre-flight checks of the output dir, graceful stop on SIGTERM / SIGINT,
a non-finite loss / gradient guard, and the small state (bad-record and skip counters) a checkpoint carries.

The promise (docs/RELIABILITY.md): a run never loses more than the last checkpoint interval and never loads a
broken checkpoint. Checkpoint atomicity and verification live in checkpoint.py; what is here is installed by
`LlavaTrainer` when training starts (never at import) and removed when it ends.

Exit codes: a run stopped by a signal exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
shell convention, after saving a checkpoint; `training.resume=true` continues from it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from llava_train.model.zero3 import full_numel

logger = logging.getLogger(__name__)

FAULT_STATE_FILE = "fault_state.json"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable element


class Preempted(SystemExit):
    """Raised after a signal stopped training and a checkpoint was saved; exit code 128 + signum."""

    def __init__(self, signum: int, step: int, run_dir: str):
        name = signal.Signals(signum).name
        self.message = (
            f"received {name}: stopped after step {step} and saved {run_dir}/checkpoint-{step}. "
            f"Resume with training.resume=true (exit code {128 + signum})."
        )
        super().__init__(128 + signum)


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


# ---- pre-flight: fail before training, not at the first save hours later -------------------------
def _probe_write(path: Path) -> None:
    path.write_bytes(b"probe")
    path.unlink()


def check_writable(run_dir: str | os.PathLike) -> None:
    """Create and remove a probe file in run_dir; raise PermissionError with the fix when that fails."""
    run = Path(run_dir)
    probe = run / f".write_probe.{os.getpid()}"
    try:
        run.mkdir(parents=True, exist_ok=True)
        _probe_write(probe)
    except OSError as e:
        raise PermissionError(
            f"training.run_dir={run} is not writable ({e.strerror or e}): checkpoints could not be saved. "
            "Fix its permissions, or point training.run_dir at a writable directory."
        ) from e


def checkpoint_bytes(model: nn.Module, full_model: bool, deepspeed: bool = False) -> int:
    """Estimated size of one checkpoint: saved weights + AdamW moments (+ DeepSpeed's fp32 master copy).

    `full_model`: every parameter is saved (stage `finetune`); otherwise only the trainable ones.
    """
    total = 0
    for p in model.parameters():
        numel = full_numel(p)  # ZeRO-3 partitions leave numel() == 0
        size = numel * p.element_size()
        if p.requires_grad:
            total += size + numel * (ADAM_STATE_BYTES + (4 if deepspeed else 0))
        elif full_model:
            total += size
    return total


def check_free_space(run_dir: str | os.PathLike, needed: int) -> None:
    """Raise OSError (ENOSPC) with the fix when run_dir's disk has less than `needed` bytes free."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise OSError(
            28,
            f"not enough disk space in {run_dir}: one checkpoint needs about {needed / 2**30:.2f} GiB "
            f"(weights + optimizer state), {free / 2**30:.2f} GiB free. Free space, lower "
            "training.save_total_limit, or point training.run_dir at a larger disk.",
        )


# ---- SIGTERM / SIGINT: finish the step, save, exit -------------------------------------------------
class GracefulStop(TrainerCallback):
    """Turns SIGTERM / SIGINT into "finish this step, save a checkpoint, stop". A second SIGINT aborts.

    Ranks agree on the stop with an all-reduce at each step end: a save is collective under DeepSpeed, and a
    scheduler may signal the ranks a few steps apart.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("training outside the main thread: SIGTERM / SIGINT will not save a checkpoint")
            return
        for sig in HANDLED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            # torchrun forwards the scheduler's SIGTERM to its workers, which then get it twice: keep
            # saving. A second Ctrl-C is a person who does not want to wait: abort now.
            if signum == signal.SIGINT:
                raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
            logger.warning("received %s again: already stopping after this step", name)
            return
        self.signum = signum
        logger.warning(
            "received %s: finishing the current step, then saving a checkpoint (Ctrl-C again aborts now)",
            name,
        )

    def _agreed_signal(self) -> int | None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self.signum
        flag = torch.tensor([self.signum or 0], dtype=torch.long)
        if torch.distributed.get_backend() == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def on_step_end(self, args, state, control, **kwargs):
        signum = self._agreed_signal()
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True
        return control


# ---- non-finite loss / gradient guard --------------------------------------------------------------
class NonFiniteGuard:
    """Skips the optimizer update of a step whose loss or gradient norm is NaN / inf; raises after
    `max_in_a_row` such steps in a row, naming the record ids of the last bad step's batches."""

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # total, logged and checkpointed
        self.in_a_row = 0
        self._bad_loss = False
        self._ids: list[str] = []
        self.grad_norm: float | None = None  # the Trainer's norm of this step, when known before the update

    def record_batch(self, loss: torch.Tensor, sample_ids: Iterable[str] | None) -> None:
        """Called per micro-batch with its loss: remembers the ids and whether the loss was finite."""
        self._ids.extend(str(i) for i in sample_ids or ())
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad_loss = True

    def guard_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace `optimizer.step` with one that is skipped when the accumulated micro-batches were not finite.

        A bound method, not a plain function: torch's LR schedulers re-wrap `step` through its `__func__`.
        """
        step = optimizer.step

        def guarded_step(opt: torch.optim.Optimizer, *args, **kwargs):
            try:
                if self._bad_loss or not self._grad_norm_finite(opt):
                    return self._skip()
                self.in_a_row = 0
                return step(*args, **kwargs)
            finally:
                self._bad_loss, self._ids, self.grad_norm = False, [], None

        optimizer.step = types.MethodType(guarded_step, optimizer)

    def _grad_norm_finite(self, optimizer: torch.optim.Optimizer) -> bool:
        # Reuse the Trainer's norm (clipping computes it anyway); under DeepSpeed the engine steps before the
        # Trainer computes it, so look at the gradients of the (ZeRO partition's) parameters instead.
        if self.grad_norm is not None:
            return math.isfinite(self.grad_norm)
        return _grads_finite([p for g in optimizer.param_groups for p in g["params"]])

    def _skip(self) -> None:
        self.skipped += 1
        self.in_a_row += 1
        ids = self._ids[:32]
        logger.warning(
            "non-finite loss or gradient norm: optimizer step skipped (%d in a row, %d in total); records %s",
            self.in_a_row,
            self.skipped,
            ids,
        )
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient norm "
                f"(training.max_nonfinite_steps={self.max_in_a_row}); last batch's record ids: {ids}. "
                "Inspect those records, lower the learning rate, or use fp32 / bf16 instead of fp16."
            )


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return math.isfinite(float(norm))


# ---- state a checkpoint carries beyond the Trainer's ------------------------------------------------
COUNTS_KEY = "bad_record_counts"


class CountingCollator:
    """Wraps the collator: each batch carries the dataset's bad-record counters as of its collation.

    Why not read the counters at save time: the data loader has already fetched the next batch (accelerate
    looks one batch ahead, workers prefetch more), so its records would be counted twice after a resume. The
    trainer keeps the counts of the last batch it trained on and checkpoints those. Exact with
    data.num_workers=0; with workers the counters are shared, so a batch's snapshot may include records other
    workers fetched ahead of it (an over-count of at most num_workers x prefetch_factor batches).
    """

    def __init__(self, collator: Any, dataset: Any):
        self.collator, self.dataset = collator, dataset

    def __call__(self, samples: list[dict]) -> dict:
        batch = self.collator(samples)
        batch[COUNTS_KEY] = self.dataset.bad_record_stats()
        return batch


def save_fault_state(
    out_dir: str | os.PathLike, bad_record_counts: dict[str, int], guard: NonFiniteGuard
) -> None:
    """The bad-record counters of the data trained on so far and the skipped-step count, for a resume."""
    state = {
        "bad_record_stats": bad_record_counts,
        "nonfinite_skipped": guard.skipped,
        "nonfinite_in_a_row": guard.in_a_row,  # a diverging run gets no fresh allowance from a resume
    }
    Path(out_dir, FAULT_STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def load_fault_state(ckpt_dir: str | os.PathLike, dataset: Any, guard: NonFiniteGuard) -> dict[str, int]:
    """Restore what save_fault_state wrote; returns the restored bad-record counters ({} for checkpoints from
    before this file existed)."""
    path = Path(ckpt_dir, FAULT_STATE_FILE)
    if not path.is_file():
        return {}
    state = json.loads(path.read_text())
    guard.skipped = int(state.get("nonfinite_skipped", 0))
    guard.in_a_row = int(state.get("nonfinite_in_a_row", 0))
    stats = {k: int(n) for k, n in (state.get("bad_record_stats") or {}).items()}
    if hasattr(dataset, "bad_record_stats"):
        # The counters of a fresh dataset hold what building it read; set them to the checkpoint's values
        # through the dataset's own counter (shared memory, seen by workers started after this).
        current = dataset.bad_record_stats()
        for kind in set(stats) | set(current):
            dataset._count(kind, stats.get(kind, 0) - current.get(kind, 0))
    logger.info("restored fault state from %s: %s", path, state)
    return stats
