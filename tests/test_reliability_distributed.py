"""DeepSpeed resume through the safe checkpoint engine (issue 19, item 1), one torchrun process on CPU (gloo).

A genuine ZeRO-2 / ZeRO-3 checkpoint resumes (the allowlist holds every type DeepSpeed saves); a planted
pickle in `mp_rank_00_model_states.pt`, with `COMPLETE` rewritten to match it (size and hash), runs nothing
and the run fails naming the file. `make test-distributed` (~1 min a launch after DeepSpeed's JIT build).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_distributed import DRIVER
from test_reliability import Planted, _rewrite_manifest
from train_utils import make_colour_dataset, tiny_overrides, torchrun

from llava_train.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed
REPO = Path(__file__).resolve().parent.parent
# The model states file of each ZeRO stage (read first on resume).
STATES = {
    "zero2": "global_step2/mp_rank_00_model_states.pt",
    "zero3": "global_step2/zero_pp_rank_0_mp_rank_00_model_states.pt",
}


def _launch(run_dir: Path, data_json: Path, zero: str, max_steps: int, *extra: str):
    overrides = [
        "+stage=finetune_lora",
        f"deepspeed={zero}",
        "stage.pretrain_mm_mlp_adapter=null",
        "stage.lora.r=8",
        *tiny_overrides(data_json, run_dir, max_steps=max_steps, save_steps=2, global_batch_size=2),
        "training.per_device_batch_size=2",
        *extra,
    ]
    # the code under test, not whichever checkout the venv's editable install points at
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*torchrun(1), str(DRIVER), *overrides], cwd=run_dir.parent, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_deepspeed_resume_is_safe_and_a_planted_pickle_runs_nothing(tmp_path, zero):
    data_json = make_colour_dataset(tmp_path / "colours", n=16)
    first = _launch(tmp_path / "run", data_json, zero, 2)  # checkpoint-2
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    planted = tmp_path / "planted"
    shutil.copytree(tmp_path / "run", planted)

    resumed = _launch(tmp_path / "run", data_json, zero, 3, "training.resume=true")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    # rc 0: every DeepSpeed state loaded through the safe engine (a type missing from the allowlist fails)
    assert sorted(int(s) for s in json.loads((tmp_path / "run" / "rank0.json").read_text())["losses"]) == [
        1,
        2,
        3,
    ]

    marker = tmp_path / "code_ran"
    target = planted / "checkpoint-2" / STATES[zero]
    torch.save({"module": {}, "dp_world_size": 1, "x": Planted(marker)}, target)
    _rewrite_manifest(planted / "checkpoint-2", STATES[zero])
    assert not ckpt.verify_checkpoint(
        planted / "checkpoint-2"
    )  # the manifest does not stop it: the loader must
    attacked = _launch(planted, data_json, zero, 3, "training.resume=true")
    out = attacked.stdout + attacked.stderr
    assert attacked.returncode != 0, out[-3000:]
    assert "UnsafeCheckpointError" in out and f"refusing to load {target}" in out, out[-3000:]
    assert not marker.exists()
