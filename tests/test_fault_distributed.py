"""SIGTERM / SIGKILL under two-process DeepSpeed ZeRO-2 on CPU (gloo), then resume.

torchrun gets SIGTERM and forwards it to its workers (SLURM may also signal every task directly: a repeated
SIGTERM is ignored); for SIGKILL the workers are killed too, as on a lost node. On SIGTERM both ranks agree to stop at one step, save one complete checkpoint together and exit
non-zero; on SIGKILL nothing runs. Either way `training.resume=true` continues from the newest complete
checkpoint and reproduces an uninterrupted run's losses and weights. `make test-distributed` (~1 min a case).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_distributed import DRIVER
from train_utils import lora_deepspeed_overrides, make_colour_dataset, torchrun

from llava_train.train import checkpoint as ckpt

pytestmark = pytest.mark.distributed


def _torchrun(overrides: list[str], cwd: Path) -> subprocess.Popen:
    cmd = [*torchrun(2), str(DRIVER), *overrides]
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


def _children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after the command: state, ppid, ...
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_signal_under_two_process_deepspeed_then_resume_matches_uninterrupted(tmp_path, signum):
    data_json = make_colour_dataset(tmp_path / "colours", n=48)

    def overrides(run_dir: Path, max_steps: int, *extra: str) -> list[str]:
        return lora_deepspeed_overrides(data_json, run_dir, "zero2", max_steps, *extra)

    run_dir = tmp_path / "cut"
    proc = _torchrun(overrides(run_dir, 400), tmp_path)
    deadline = time.time() + 600
    while not (run_dir / "checkpoint-2" / ckpt.COMPLETE_MARKER).is_file():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    if signum == signal.SIGKILL:  # a lost node: the workers (torchrun puts them in their own sessions) too
        for pid in _children(proc.pid):
            os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signum)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out[-4000:]
    if signum == signal.SIGTERM:  # both ranks stop at one step and save it together
        assert "received SIGTERM: stopped after step" in out, out[-4000:]
        assert not ckpt.checkpoints(run_dir)[1], "a partial checkpoint after a graceful stop"
    last = ckpt.latest_complete_checkpoint(run_dir)
    step = json.loads((last / "trainer_state.json").read_text())["global_step"]
    assert 2 <= step < 400

    # Resume, and (at the same time) an uninterrupted run to the same step.
    runs = {
        "cut": _torchrun(overrides(run_dir, step + 2, "training.resume=true"), tmp_path),
        "full": _torchrun(overrides(tmp_path / "full", step + 2), tmp_path),
    }
    for proc in runs.values():
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-4000:]
    cut, full = ([json.loads((tmp_path / r / f"rank{k}.json").read_text()) for k in (0, 1)] for r in runs)
    assert cut[0]["losses"] == cut[1]["losses"]
    for s in (str(step + 1), str(step + 2)):
        assert cut[0]["losses"][s] == pytest.approx(full[0]["losses"][s], rel=1e-4), (s, cut, full)
    assert cut[0]["checksum"] == pytest.approx(full[0]["checksum"], rel=1e-5)
