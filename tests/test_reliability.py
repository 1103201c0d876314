"""Reliability and security of training (issue 19, docs/RELIABILITY.md): no code runs from a checkpoint, a
corrupted checkpoint is refused naming the file, no earlier run is overwritten, resume without a complete
checkpoint is an error, a full disk mid-save keeps the last complete checkpoint, on the tiny model on CPU."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from train_utils import compose_config, make_colour_dataset, run_steps, tiny_overrides

from llava_train.config import LlmTuning, to_typed
from llava_train.train import checkpoint as ckpt
from llava_train.train import faults, steps
from llava_train.train.manifest import file_digest


@pytest.fixture(scope="module")
def data_json(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=16)


def overrides(data_json: Path, run_dir: Path, *extra: str, **training) -> list[str]:
    return [
        "+stage=pretrain",
        "stage.pretrain_mm_mlp_adapter=null",
        "data.num_workers=0",
        *tiny_overrides(data_json, run_dir, **{"max_steps": 2, "save_steps": 2, **training}),
        *extra,
    ]


@pytest.fixture(scope="module")
def run2(data_json, tmp_path_factory):
    """A 2-step pretrain run with a checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("run2")
    trainer, _, _ = run_steps(compose_config(overrides(data_json, run_dir)))
    return run_dir, trainer


class Planted:
    """A pickle whose loading runs a shell command (creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _rewrite_manifest(ckpt_dir: Path, rel: str) -> None:
    """What an attacker who can write the checkpoint does: make COMPLETE agree with the planted file."""
    marker = json.loads((ckpt_dir / ckpt.COMPLETE_MARKER).read_text())
    marker["files"][rel] = {"size": (ckpt_dir / rel).stat().st_size, "sha256": file_digest(ckpt_dir / rel)}
    (ckpt_dir / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))


# ---- 1. no code runs from a DeepSpeed state file --------------------------------------------------
def test_deepspeed_engine_runs_a_planted_pickle_and_ours_refuses_it_naming_the_file(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from llava_train.train.safe_load import UnsafeCheckpointError, use_safe_checkpoint_engine

    path, marker = tmp_path / "mp_rank_00_model_states.pt", tmp_path / "code_ran"
    torch.save({"module": {"w": torch.zeros(2)}, "x": Planted(marker)}, path)
    engine = TorchCheckpointEngine()
    engine.load(str(path))  # DeepSpeed's own loader: the planted command runs
    assert marker.exists(), "the planted pickle is not live: the test would prove nothing"
    marker.unlink()
    use_safe_checkpoint_engine(SimpleNamespace(checkpoint_engine=engine))
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(path)) + ".*system"):
        engine.load(str(path), map_location="cpu")
    assert not marker.exists()


def test_the_deepspeed_state_types_load_with_weights_only(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from llava_train.train.safe_load import safe_torch_load

    state = {
        "loss_scaler": LossScaler(1.0),
        "dynamic": DynamicLossScaler(2.0**16, 1000, 1, 2, False),
        "zero_stage": ZeroStageEnum.gradients,
        "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
        "param_shapes": [{"w": torch.Size([2, 2])}],
        "fp32": [torch.ones(4)],
    }
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = safe_torch_load(tmp_path / "optim_states.pt")
    assert loaded["zero_stage"] is ZeroStageEnum.gradients
    assert loaded["dynamic"].cur_scale == 2.0**16
    assert loaded["param_slice_mappings"][0]["w"].numel == 4


# ---- 1 / 10. content hashes in the manifest, checked on resume ------------------------------------
def test_manifest_hashes_every_file_and_resume_refuses_a_same_size_corruption(run2, data_json, tmp_path):
    run_dir, _ = run2
    good = run_dir / "checkpoint-2"
    files = json.loads((good / ckpt.COMPLETE_MARKER).read_text())["files"]
    assert set(files) == set(ckpt.manifest(good))
    assert all(e["sha256"] == file_digest(good / rel) for rel, e in files.items())
    assert not ckpt.verify_checkpoint(good)
    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(good, copy)
    data = bytearray((copy / ckpt.PROJECTOR_FILE).read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])  # bit flips in the tensor data: same size
    (copy / ckpt.PROJECTOR_FILE).write_bytes(data)
    assert not ckpt.checkpoint_problems(copy)  # sizes agree: only the hash sees it
    raw = compose_config(overrides(data_json, tmp_path / "run", resume="true", max_steps=4))
    with pytest.raises(
        ValueError, match=f"refusing to resume .*{re.escape(str(copy / ckpt.PROJECTOR_FILE))}"
    ):
        run_steps(raw)


def test_a_corrupted_safetensors_file_under_a_sizes_only_manifest_is_named(run2, tmp_path):
    run_dir, trainer = run2
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(run_dir / "checkpoint-2", copy)
    (copy / ckpt.PROJECTOR_FILE).write_bytes(b"\x00" * (copy / ckpt.PROJECTOR_FILE).stat().st_size)
    with pytest.raises(ValueError, match=re.escape(str(copy / ckpt.PROJECTOR_FILE)) + ".*not a readable"):
        ckpt.load_trainables(trainer.model, copy, LlmTuning.frozen)


# ---- 3. an earlier run is not overwritten ---------------------------------------------------------
def test_a_run_dir_holding_a_run_is_refused_unless_resume_or_overwrite(run2, data_json, tmp_path):
    run_dir = tmp_path / "reused"
    shutil.copytree(run2[0], run_dir)
    raw = compose_config(overrides(data_json, run_dir))
    with pytest.raises(FileExistsError, match="training.resume=true.*training.overwrite=true"):
        steps.setup_run(to_typed(raw), raw)
    assert (run_dir / "checkpoint-2" / ckpt.COMPLETE_MARKER).is_file()
    raw = compose_config(overrides(data_json, run_dir, overwrite="true"))
    steps.setup_run(to_typed(raw), raw)
    assert not list(run_dir.glob("checkpoint-*")), "an old checkpoint would be resumed later"


# ---- 4. resume=true without a complete checkpoint -------------------------------------------------
def test_resume_with_only_partial_checkpoints_is_an_error_naming_them(data_json, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(b"x")
    cfg = to_typed(compose_config(overrides(data_json, tmp_path, resume="true")))
    with pytest.raises(
        FileNotFoundError, match="only partial ones .checkpoint-3: no COMPLETE.*overwrite=true"
    ):
        steps.train(SimpleNamespace(), cfg)  # refused before the trainer is touched
    assert steps.resume_checkpoint(tmp_path / "empty") is None  # no checkpoint at all: a first launch


# ---- 5. disk space ---------------------------------------------------------------------------------
def test_disk_space_estimate_covers_every_file_of_a_checkpoint(run2):
    run_dir, trainer = run2
    written = sum(p.stat().st_size for p in (run_dir / "checkpoint-2").rglob("*") if p.is_file())
    tensors = faults.checkpoint_bytes(trainer.model, full_model=False)
    assert tensors < written, "the tensors-only estimate misses the tokenizer: the test would prove nothing"
    estimate = faults.estimate_checkpoint_bytes(trainer.model, trainer.processing_class, False, False)
    assert written <= estimate <= written + faults.SMALL_FILES_BYTES + (1 << 20)


def test_disk_full_mid_save_keeps_the_last_complete_checkpoint(data_json, tmp_path, monkeypatch):
    real, calls = ckpt.save_stage_weights, []

    def fill_disk_on_second_save(out_dir, *args):
        calls.append(out_dir)
        if len(calls) < 2:
            return real(out_dir, *args)
        os.makedirs(out_dir, exist_ok=True)
        Path(out_dir, ckpt.PROJECTOR_FILE).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_stage_weights", fill_disk_on_second_save)
    with pytest.raises(faults.DiskFullError, match=r"mounted at .* needs about [\d.]+ MiB.*resume=true"):
        run_steps(compose_config(overrides(data_json, tmp_path, max_steps=4, save_steps=2)))
    assert not (tmp_path / ckpt.STAGING_DIR).exists()
    assert [p.name for p in ckpt.checkpoints(tmp_path)[0]] == ["checkpoint-2"]
    assert not ckpt.checkpoints(tmp_path)[1]


def test_torch_save_wording_counts_as_a_full_disk():
    assert faults.is_disk_full(
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    )
    assert not faults.is_disk_full(RuntimeError("shape mismatch"))


def test_a_probe_write_that_fills_the_disk_leaves_no_probe_file(tmp_path, monkeypatch):
    def half_write(self, data):
        open(self, "wb").close()  # created, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_write)
    with pytest.raises(PermissionError, match="not writable"):
        faults.check_writable(tmp_path)
    assert not list(tmp_path.glob(".write_probe*"))
