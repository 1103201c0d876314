"""Fault tolerance for training runs: pre-flight checks of the output dir, graceful stop on SIGTERM / SIGINT,
a non-finite loss / gradient guard, and the small state (bad-record and skip counters) a checkpoint carries.

The promise (docs/RELIABILITY.md): a run never loses more than the last checkpoint interval and never loads a
broken checkpoint. Checkpoint atomicity and verification live in checkpoint.py; what is here is installed by
`LlavaTrainer` when training starts (never at import) and removed when it ends.

Exit codes: a run stopped by a signal exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
shell convention, after saving a checkpoint; `training.resume=true` continues from it.
"""

from __future__ import annotations

import errno
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
    try:
        path.write_bytes(b"probe")
    finally:  # a write that failed half-way (a full disk) leaves the file created: remove it too
        path.unlink(missing_ok=True)


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


def check_run_dir_reuse(run_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse a run dir that holds an earlier run (its config.yaml or checkpoints) unless told what to do
    with it: `resume` continues it, `overwrite` deletes its checkpoints (so that no later resume loads one of
    the old run's) and trains anew. Rank 0 only, before it writes this run's config.yaml."""
    from llava_train.train.checkpoint import STAGING_DIR

    run = Path(run_dir)
    old_ckpts = sorted(p for p in run.glob("checkpoint-*") if p.is_dir())
    held = [p.name for p in old_ckpts] + [n for n in ("config.yaml", STAGING_DIR) if (run / n).exists()]
    if not held or resume:
        return
    if not overwrite:
        raise FileExistsError(
            f"training.run_dir={run} holds an earlier run ({', '.join(held[:6])}): training into it would "
            "replace its weights and config.yaml and mix its checkpoints with this run's. Continue it with "
            "training.resume=true, start it over with training.overwrite=true (deletes its checkpoints), or "
            "choose another training.run_dir."
        )
    for p in [*old_ckpts, run / STAGING_DIR]:
        shutil.rmtree(p, ignore_errors=True)
    logger.warning("training.overwrite=true: deleted the earlier run's %s in %s", held, run)


def tokenizer_bytes(tokenizer: Any) -> int:
    """Bytes the tokenizer's files take in a checkpoint (every checkpoint saves them): measured by saving it
    to a temporary directory (off the run dir's disk, which may be the full one)."""
    import tempfile

    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())


# trainer_state.json, config.json, scheduler.pt, rng_state*.pth, fault_state.json, COMPLETE, adapter and
# DeepSpeed metadata: a few KiB each on the tiny model, tens of KiB at 7B (log history); a generous bound.
SMALL_FILES_BYTES = 4 << 20


def checkpoint_bytes(model: nn.Module, full_model: bool, deepspeed: bool = False) -> int:
    """Estimated size of one checkpoint's tensors: saved weights + AdamW moments (+ DeepSpeed's fp32 master
    copy). `full_model`: every parameter is saved (stage `finetune`); otherwise only the trainable ones.
    The tokenizer and small files come on top (`tokenizer_bytes`, SMALL_FILES_BYTES).
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


def estimate_checkpoint_bytes(model: nn.Module, tokenizer: Any, full_model: bool, deepspeed: bool) -> int:
    """Every file one checkpoint writes: tensors and optimizer state, tokenizer, small files."""
    return checkpoint_bytes(model, full_model, deepspeed) + tokenizer_bytes(tokenizer) + SMALL_FILES_BYTES


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk: ENOSPC, or torch.save's / safetensors' wording."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "file write failed" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


class DiskFullError(OSError):
    """The disk filled up while a checkpoint was written; the partial write was removed."""


def disk_full_error(run_dir: str | os.PathLike, needed: int | None, cause: BaseException) -> DiskFullError:
    """The error a save that hit ENOSPC raises: names the disk, the space a checkpoint needs and the fix."""
    mount = _mount_point(Path(run_dir))
    free = shutil.disk_usage(run_dir).free
    need = f"about {needed / 2**20:.1f} MiB" if needed else "its size (training.check_disk_space=true tells)"
    return DiskFullError(
        errno.ENOSPC,
        f"the disk of {run_dir} (mounted at {mount}) filled up while a checkpoint was written ({cause}). "
        f"The partial checkpoint was removed; the last complete one is kept. One checkpoint needs {need}, "
        f"{free / 2**20:.1f} MiB are free now. Free space (or lower "
        "training.save_total_limit, or move training.run_dir to a larger disk), then resume with "
        "training.resume=true.",
    )


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def check_free_space(run_dir: str | os.PathLike, needed: int) -> None:
    """Raise OSError (ENOSPC) with the fix when run_dir's disk has less than `needed` bytes free."""
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise OSError(
            28,
            f"not enough disk space in {run_dir} (disk mounted at {_mount_point(Path(run_dir))}): one "
            f"checkpoint needs about {needed / 2**30:.3f} GiB (weights + optimizer state + tokenizer and small "
            f"files), {free / 2**30:.3f} GiB free. Free space, lower "
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
