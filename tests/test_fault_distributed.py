"""SIGTERM under two-process DeepSpeed ZeRO-2 on CPU (gloo): what a scheduler does before pre-emption.

The whole process group gets SIGTERM (as SLURM sends it to every task; torchrun forwards it again to its
workers). Both ranks agree to stop at the same step, save one complete checkpoint together, and exit non-zero;
`training.resume=true` continues from that checkpoint. `make test-distributed` (~1-2 min).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distributed import DRIVER, _free_port
from test_train_utils import make_colour_dataset, tiny_overrides

from llava_train.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed


def _torchrun(overrides: list[str], cwd: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(DRIVER), *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_sigterm_under_two_process_deepspeed_saves_and_resumes(tmp_path):
    data_json = make_colour_dataset(tmp_path / "colours", n=48)
    run_dir = tmp_path / "run"

    def overrides(max_steps: int, *extra: str) -> list[str]:
        return [
            "+stage=finetune_lora",
            "deepspeed=zero2",
            "stage.pretrain_mm_mlp_adapter=null",
            "stage.lora.r=8",
            *tiny_overrides(
                data_json,
                run_dir,
                learning_rate=2e-3,
                max_steps=max_steps,
                save_steps=2,
                global_batch_size=8,
                save_total_limit=10,
            ),
            "training.per_device_batch_size=2",
            *extra,
        ]

    proc = _torchrun(overrides(400), tmp_path)
    deadline = time.time() + 600
    while not (run_dir / "checkpoint-2" / ckpt.COMPLETE_MARKER).is_file():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out[-4000:]
    assert "received SIGTERM: stopped after step" in out, out[-4000:]
    last = ckpt.latest_complete_checkpoint(run_dir)
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 400 and not ckpt.checkpoints(run_dir)[1], "both ranks saved one complete checkpoint"

    resumed = _torchrun(overrides(step + 2, "training.resume=true"), tmp_path)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out[-4000:]
    losses = [json.loads((run_dir / f"rank{r}.json").read_text())["losses"] for r in (0, 1)]
    assert losses[0] == losses[1] and {str(step + 1), str(step + 2)} <= set(losses[0]), losses
