"""Checkpoint files per stage, atomic checkpoint directories, and finding the latest complete one.

Layout of `<run_dir>/checkpoint-<step>/` (written by `LlavaTrainer`):

    pretrain       mm_projector.safetensors        projector (+ image_newline), original key names
                   vision_tower.safetensors        only when the tower trains
    finetune_lora  adapter_model.safetensors + adapter_config.json   (peft)
                   non_lora_trainables.safetensors projector, image_newline, [vision tower], original keys
    finetune       model.safetensors (+ config.json)                 the full model
    all            trainer_state.json, optimizer.pt, scheduler.pt, rng_state*.pth (or DeepSpeed's
                   global_step*/ under DeepSpeed), config.json of the LLaVA model, COMPLETE

A checkpoint is written under `<run_dir>/.staging/checkpoint-<step>`, renamed into place, and then marked
with the `COMPLETE` file, a JSON manifest of every file's relative path, size and SHA-256 (manifest.py). A
directory without the marker, or whose files disagree with the manifest's sizes (missing, truncated: a crash,
a kill or a lost page cache during save), is partial: `latest_complete_checkpoint` reports why and skips it.
The hashes are checked only for the checkpoint a resume loads (`verify_checkpoint`): a same-size corruption
is refused there, naming the file. Markers written before the manifest existed (no "files" key) or before it
held hashes (sizes only) are accepted as complete, their contents unchecked.

Who writes what (one node or several): global rank 0 writes the shared files (weights of the stage, configs,
tokenizer, trainer_state.json, scheduler.pt, the fault state, `COMPLETE`); every rank writes its own shards
(rng_state_<rank>.pth, DeepSpeed's per-rank optimizer and ZeRO-3 model states) into the same staging
directory. So run_dir must be one directory every node sees: `check_run_dir_shared` refuses a run whose
nodes each have their own (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava_train.config import LlmTuning
from llava_train.constants import NON_LORA_FILE, PROJECTOR_FILE, VISION_TOWER_FILE
from llava_train.train.manifest import content_manifest, content_problems, entry_size
from llava_train.train.stages import component_of, original_name

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
STAGING_DIR = ".staging"
SHARED_PROBE = ".shared_run_dir_probe"  # rank 0 writes it; every rank must read it back
_CKPT_RE = re.compile(r"checkpoint-(\d+)")


def checkpoints(run_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, partial) checkpoint directories of a run, each sorted by step."""
    run = Path(run_dir)
    found = sorted(
        (int(m.group(1)), p)
        for p in run.glob("checkpoint-*")
        if (m := _CKPT_RE.fullmatch(p.name)) and p.is_dir()
    )
    ok = {p: not checkpoint_problems(p) for _, p in found}
    return [p for p in ok if ok[p]], [p for p in ok if not ok[p]]


def checkpoint_problems(ckpt_dir: str | os.PathLike) -> list[str]:
    """Why a checkpoint directory is not loadable ([] when it is): no / unreadable marker, or files that
    disagree with the marker's manifest."""
    ckpt = Path(ckpt_dir)
    try:
        marker = json.loads((ckpt / COMPLETE_MARKER).read_text())
    except FileNotFoundError:
        return [f"no {COMPLETE_MARKER} marker: the save was interrupted"]
    except (OSError, ValueError) as e:
        return [f"unreadable {COMPLETE_MARKER} marker ({e})"]
    problems = []
    for rel, entry in (marker.get("files") or {}).items():
        path, size = ckpt / rel, entry_size(entry)
        if not path.is_file():
            problems.append(f"{rel} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{rel} has {path.stat().st_size} bytes, the manifest says {size}")
    return problems


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> list[str]:
    """checkpoint_problems, then every file's SHA-256 against the manifest ([] when the checkpoint is sound).
    Reads every file: for the one checkpoint a resume is about to load."""
    problems = checkpoint_problems(ckpt_dir)
    if problems:
        return problems
    files = json.loads((Path(ckpt_dir) / COMPLETE_MARKER).read_text()).get("files") or {}
    if not any(isinstance(e, dict) for e in files.values()):
        logger.warning("%s: its manifest holds no hashes (an older save); contents not verified", ckpt_dir)
    return content_problems(ckpt_dir, files)


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete, verified checkpoint; partial ones are logged with the reason and skipped."""
    complete, partial = checkpoints(run_dir)
    for p in partial:
        logger.warning("ignoring partial checkpoint %s: %s", p, "; ".join(checkpoint_problems(p)))
    return complete[-1] if complete else None


def manifest(ckpt_dir: Path) -> dict[str, int]:
    """Relative path -> size of every file under a checkpoint directory (the marker excluded)."""
    files = (p for p in sorted(ckpt_dir.rglob("*")) if p.is_file())
    return {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in files if p.name != COMPLETE_MARKER}


def finalize_checkpoint(staged: Path, final: Path, step: int) -> None:
    """Rename a fully written staging directory into place, then mark it complete (rank 0 only)."""
    files = content_manifest(staged, exclude=(COMPLETE_MARKER,))  # hashed while still in the page cache
    if final.exists():  # an older incomplete (or superseded) write of the same step
        shutil.rmtree(final)
    os.replace(staged, final)
    with contextlib.suppress(OSError):  # the staging parent, when no other checkpoint is being written
        staged.parent.rmdir()
    marker = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files}
    tmp = final / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(marker) + "\n")
    os.replace(tmp, final / COMPLETE_MARKER)


def rotate_checkpoints(run_dir: str | os.PathLike, keep: int | None) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (partial ones are left for inspection)."""
    if not keep or keep <= 0:
        return
    complete, _ = checkpoints(run_dir)
    for p in complete[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def check_run_dir_shared(run_dir: str | os.PathLike, probe_wait_s: float = 5.0) -> None:
    """Refuse a multi-process run whose ranks do not all see one run_dir (collective: every rank calls it).

    Global rank 0 writes a random token to `run_dir/.shared_run_dir_probe`; every rank reads it back, waiting
    up to `probe_wait_s` (a network file system may show a new file late). A node with its own local run_dir
    would get only its ranks' shards and no `COMPLETE` marker, and could not resume: every rank raises the
    same error, naming the ranks and hosts that saw another directory, before anything trains.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    probe = Path(run_dir) / SHARED_PROBE
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        tmp = probe.with_name(probe.name + ".tmp")
        tmp.write_text(token[0])
        os.replace(tmp, probe)
    dist.broadcast_object_list(token, src=0)
    deadline = time.monotonic() + probe_wait_s
    while not (seen := _read_probe(probe) == token[0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise RuntimeError(
            f"training.run_dir={run_dir} is not shared between the nodes: {', '.join(blind)} cannot see the "
            f"file {SHARED_PROBE} that rank 0 on {views[0][1]} wrote there. Every rank writes its checkpoint "
            "shards into run_dir and rank 0 marks the checkpoint complete, so with one run_dir per node no "
            "checkpoint could be resumed. Put training.run_dir on a file system every node mounts (NFS, "
            "Lustre, a cloud file share) at the same path."
        )


def _read_probe(probe: Path) -> str | None:
    try:
        return probe.read_text()
    except OSError:
        return None


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage (tied weights, views).
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_stage_weights(out_dir: str, tune_llm: LlmTuning, state_dict: dict, trainable: set[str]) -> list[str]:
    """Write the weight files of a stage that trains the LLM ``tune_llm`` (frozen: the projector and a tuned
    tower; lora: the non-LoRA trainables; see module docstring); returns the file names written.

    `state_dict` may be the full model's (ZeRO-3 gathered) or only the trainable parameters
    (Trainer's ZeRO-3 + peft path); `trainable` holds the names with requires_grad.
    """
    os.makedirs(out_dir, exist_ok=True)
    written = []
    if tune_llm is LlmTuning.frozen:
        proj = {
            original_name(k): v
            for k, v in state_dict.items()
            if component_of(k) in ("projector", "image_newline")
        }
        save_file(_tensors(proj), os.path.join(out_dir, PROJECTOR_FILE), metadata={"format": "pt"})
        written.append(PROJECTOR_FILE)
        tower = {
            original_name(k): v
            for k, v in state_dict.items()
            if k in trainable and component_of(k) == "vision_tower"
        }
        tower_path = os.path.join(out_dir, VISION_TOWER_FILE)
        if tower:
            save_file(_tensors(tower), tower_path, metadata={"format": "pt"})
            written.append(VISION_TOWER_FILE)
        elif os.path.exists(tower_path):  # an earlier run's tower in this dir would be merged as this run's
            os.remove(tower_path)
            logger.warning(
                "removed %s: left by an earlier run; this run does not train the tower", tower_path
            )
    elif tune_llm is LlmTuning.lora:
        rest = {
            original_name(k): v for k, v in state_dict.items() if k in trainable and component_of(k) != "lora"
        }
        save_file(_tensors(rest), os.path.join(out_dir, NON_LORA_FILE), metadata={"format": "pt"})
        written.append(NON_LORA_FILE)
    else:
        raise ValueError(f"a stage with LLM {tune_llm.value} saves a full model, not stage weights")
    return written


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """safetensors' load_file, with an error that names the file when it is corrupt."""
    try:
        return load_file(str(path))
    except Exception as e:  # SafetensorError (header), or a tensor whose bytes do not fit its dtype / shape
        raise ValueError(
            f"{path} is not a readable safetensors file ({e}): the checkpoint is corrupted. Resume from "
            "another checkpoint (move this one away) or retrain from the last good one."
        ) from e


def load_trainables(model: nn.Module, ckpt_dir: str | os.PathLike, tune_llm: LlmTuning) -> None:
    """Load a frozen-LLM (pretrain) or LoRA checkpoint's weights back into `model` (resume without DeepSpeed).

    Every trainable parameter must be covered; a missing one means the checkpoint is not from this stage.
    """
    ckpt = Path(ckpt_dir)
    params = dict(model.named_parameters())
    by_original = {original_name(n): p for n, p in params.items()}
    loaded: set[str] = set()
    files = [PROJECTOR_FILE, VISION_TOWER_FILE] if tune_llm is LlmTuning.frozen else [NON_LORA_FILE]
    for fname in files:
        if not (ckpt / fname).is_file():
            continue
        for key, value in read_safetensors(ckpt / fname).items():
            if key not in by_original:
                raise KeyError(f"{ckpt / fname}: key {key!r} is not a parameter of this model")
            with torch.no_grad():
                by_original[key].copy_(value)
            loaded.add(key)
    if tune_llm is LlmTuning.lora:
        from peft import set_peft_model_state_dict

        adapter = read_safetensors(ckpt / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, adapter)
        bad = [k for k in getattr(result, "unexpected_keys", []) if ".lora_" in k]
        if bad:
            raise KeyError(f"{ckpt}: adapter keys not in the model: {bad[:4]}")
        loaded |= {original_name(n) for n in params if component_of(n) == "lora"}
    missing = [n for n, p in params.items() if p.requires_grad and original_name(n) not in loaded]
    if missing:
        raise ValueError(
            f"checkpoint {ckpt} lacks {len(missing)} trainable parameters (e.g. {missing[:3]}): "
            f"it was not written by a run of this model whose stage trains the LLM {tune_llm.value}."
        )
