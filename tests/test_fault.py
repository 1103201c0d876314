"""Fault tolerance (issue 7, docs/RELIABILITY.md) on the tiny model, CPU: partial / broken checkpoints are never
loaded, resume restores the bad-record counters, SIGTERM saves and exits 143, SIGKILL + resume reproduces the
uninterrupted losses, NaN / inf steps are skipped and then stop the run, and a bad run dir fails up front."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import (
    CrashAt,
    compose_config,
    logged_losses,
    make_colour_dataset,
    run_steps,
    tiny_overrides,
)
from transformers import TrainerCallback

from llava_train.train import checkpoint as ckpt
from llava_train.train import faults

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_json(tmp_path_factory) -> Path:
    """The colour set with every fourth image missing (bad_record_policy=skip counts them)."""
    path = make_colour_dataset(tmp_path_factory.mktemp("colours"), n=48)
    records = json.loads(path.read_text())
    for i in range(0, len(records), 4):
        if "image" in records[i]:
            records[i]["image"] = f"missing{i}.png"
    path.write_text(json.dumps(records))
    return path


def overrides(data_json: Path, run_dir: Path, stage: str = "pretrain", **training) -> list[str]:
    return [
        f"+stage={stage}",
        "stage.pretrain_mm_mlp_adapter=null",
        "stage.lora.r=8",
        "data.bad_record_policy=skip",
        "data.num_workers=0",  # counters are exact without prefetching workers (docs/RELIABILITY.md)
        "data.group_by_modality_length=true",
        *tiny_overrides(data_json, run_dir, learning_rate=1e-3, **training),
    ]


def _fault_state(ckpt_dir: Path) -> dict:
    return json.loads((ckpt_dir / faults.FAULT_STATE_FILE).read_text())


@pytest.fixture(scope="module")
def full_run(data_json, tmp_path_factory):
    """4 uninterrupted steps, checkpoints at 2 and 4."""
    run_dir = tmp_path_factory.mktemp("full")
    trainer, _, _ = run_steps(compose_config(overrides(data_json, run_dir, max_steps=4, save_steps=2)))
    return run_dir, logged_losses(trainer)


# ---- atomic, verified checkpoints -------------------------------------------------------------------
def test_checkpoint_cut_at_every_file_boundary_is_never_loaded(full_run, caplog):
    run_dir, _ = full_run
    good = run_dir / "checkpoint-2"
    assert not ckpt.checkpoint_problems(good)
    files = sorted(ckpt.manifest(good))
    assert {"trainer_state.json", "optimizer.pt", ckpt.PROJECTOR_FILE, faults.FAULT_STATE_FILE} <= set(files)
    cut = run_dir / "checkpoint-9"  # newer than every complete one: it would win if it were accepted

    def expect_skipped(why: str) -> None:
        caplog.clear()
        assert ckpt.latest_complete_checkpoint(run_dir).name == "checkpoint-4", why
        assert "ignoring partial checkpoint" in caplog.text and "checkpoint-9" in caplog.text, why

    for k in range(len(files) + 1):  # a save killed after k files, before the marker
        shutil.rmtree(cut, ignore_errors=True)
        cut.mkdir()
        for rel in files[:k]:
            (cut / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(good / rel, cut / rel)
        expect_skipped(f"{k} files, no marker")
    shutil.copy2(good / ckpt.COMPLETE_MARKER, cut / ckpt.COMPLETE_MARKER)
    assert not ckpt.checkpoint_problems(cut)
    for rel in files:  # marker present, one file missing or truncated (a lost page cache, a bad copy)
        data = (good / rel).read_bytes()
        (cut / rel).unlink()
        expect_skipped(f"{rel} missing")
        (cut / rel).write_bytes(data[: len(data) // 2])
        expect_skipped(f"{rel} truncated")
        (cut / rel).write_bytes(data)
    (cut / ckpt.COMPLETE_MARKER).write_text("{")
    expect_skipped("torn marker")
    shutil.rmtree(cut)


def test_resume_restores_losses_and_bad_record_counters(full_run, data_json, tmp_path):
    run_dir, losses = full_run
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_steps(
            compose_config(overrides(data_json, cut, max_steps=4, save_steps=2)), callbacks=[CrashAt(3)]
        )
    resumed, _, _ = run_steps(
        compose_config(overrides(data_json, cut, max_steps=4, save_steps=2, resume="true"))
    )
    b = logged_losses(resumed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), (step, losses, b)
    expected = _fault_state(run_dir / "checkpoint-4")
    assert expected["bad_record_stats"].get("missing_image", 0) >= 1, expected  # the test saw bad records
    assert _fault_state(cut / "checkpoint-4") == expected


def test_resume_refuses_an_explicit_broken_checkpoint(full_run, data_json, tmp_path):
    run_dir, _ = full_run
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(run_dir / "checkpoint-2", broken)
    (broken / "optimizer.pt").write_bytes(b"")
    from llava_train.config import to_typed
    from llava_train.train import steps

    cfg = to_typed(compose_config(overrides(data_json, tmp_path / "run", max_steps=4)))
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    trainer = steps.build_trainer(cfg, model, tokenizer, *steps.build_data(cfg, tokenizer, model))
    with pytest.raises(ValueError, match="refusing to resume .* optimizer.pt has 0 bytes"):
        trainer.train(resume_from_checkpoint=str(broken))


# ---- SIGTERM / SIGINT -------------------------------------------------------------------------------
class SignalAt(TrainerCallback):
    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits(data_json, tmp_path, signum):
    before = signal.getsignal(signum)
    raw = compose_config(overrides(data_json, tmp_path, max_steps=8, save_steps=100))
    with pytest.raises(faults.Preempted) as info:
        run_steps(raw, callbacks=[SignalAt(3, signum)])
    assert info.value.code == 128 + signum
    assert f"stopped after step 3 and saved {tmp_path}/checkpoint-3" in info.value.message
    assert [p.name for p in ckpt.checkpoints(tmp_path)[0]] == ["checkpoint-3"]
    assert signal.getsignal(signum) == before  # handlers live only while trainer.train runs


def _launch(run_dir: Path, data_json: Path, cwd: Path, *extra: str, stage: str = "pretrain", **training):
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        *overrides(data_json, run_dir, stage=stage, **training),
        *extra,
    ]
    return subprocess.Popen(
        cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, f"run ended before {path}: {proc.communicate()[0][-3000:]}"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def test_real_sigterm_to_the_launcher_saves_and_exits_143(data_json, tmp_path):
    run_dir = tmp_path / "run"
    proc = _launch(run_dir, data_json, tmp_path, max_steps=400, save_steps=2)
    _wait_for(run_dir / "checkpoint-2" / ckpt.COMPLETE_MARKER, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "received SIGTERM: stopped after step" in out and "training.resume=true" in out, out[-3000:]
    last = ckpt.latest_complete_checkpoint(run_dir)
    state = json.loads((last / "trainer_state.json").read_text())
    assert 2 <= state["global_step"] < 400 and last.name == f"checkpoint-{state['global_step']}"
    assert "8/8 saved" not in out  # it stopped, it did not run on to the end


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain", "finetune_lora", "finetune"])
def test_real_sigkill_then_resume_reproduces_the_uninterrupted_run(data_json, tmp_path, stage):
    """SIGKILL (no handler can run) after a checkpoint, then resume: the same losses and weights."""
    kw = dict(stage=stage, max_steps=8, save_steps=2)
    full = _launch(
        tmp_path / "full", data_json, tmp_path, **kw
    )  # concurrently: the 2 cores are shared anyway
    killed = _launch(tmp_path / "cut", data_json, tmp_path, **kw)
    _wait_for(tmp_path / "cut" / "checkpoint-4" / ckpt.COMPLETE_MARKER, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    resumed = _launch(tmp_path / "cut", data_json, tmp_path, "training.resume=true", **kw)
    for proc in (full, resumed):
        out = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out

    def history(run: str) -> dict[int, float]:
        state = json.loads((tmp_path / run / "checkpoint-8" / "trainer_state.json").read_text())
        return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}

    a, b = history("full"), history("cut")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert _fault_state(tmp_path / "cut" / "checkpoint-8") == _fault_state(tmp_path / "full" / "checkpoint-8")
    weights = {"pretrain": ckpt.PROJECTOR_FILE, "finetune_lora": "adapter_model.safetensors"}
    name = weights.get(stage, "model.safetensors")
    wa, wb = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


# ---- NaN / inf guard --------------------------------------------------------------------------------
class Poison:
    """Forward hook: NaN loss on the chosen calls; a gradient hook: inf gradient on others."""

    def __init__(self, nan_calls: set[int], inf_grad_calls: set[int] = frozenset()):
        self.nan_calls, self.inf_grad_calls, self.calls = nan_calls, inf_grad_calls, -1

    def __call__(self, model):
        model.register_forward_hook(self.forward_hook)
        param = next(p for n, p in model.named_parameters() if p.requires_grad)
        param.register_hook(lambda g: g * float("inf") if self.calls in self.inf_grad_calls else g)

    def forward_hook(self, module, args, output):
        if module.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                output.loss = output.loss * float("nan")
        return output


class ParamsPerStep(TrainerCallback):
    def __init__(self):
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.params[state.global_step] = trainable


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


def test_nonfinite_steps_are_skipped_and_counted(data_json, tmp_path):
    poison, seen = Poison(nan_calls={1}, inf_grad_calls={2}), ParamsPerStep()  # steps 2 (loss) and 3 (grad)
    raw = compose_config(overrides(data_json, tmp_path, max_steps=4, save_steps=100, max_nonfinite_steps=3))
    trainer, _, _ = run_steps(raw, callbacks=[seen], before_train=poison)
    p = seen.params
    assert not _same(p[1], p[4]) and not _same(p[3], p[4]), "finite steps must update"
    assert _same(p[1], p[2]) and _same(p[2], p[3]), "a non-finite step must not update the parameters"
    logged = [h["nonfinite_skipped"] for h in trainer.state.log_history if "loss" in h]
    assert logged == [0, 1, 2, 2], logged
    assert all(torch.isfinite(t).all() for t in p[4].values())


def test_nonfinite_steps_in_a_row_stop_the_run_naming_the_records(data_json, tmp_path):
    raw = compose_config(overrides(data_json, tmp_path, max_steps=8, save_steps=100, max_nonfinite_steps=3))
    with pytest.raises(
        faults.NonFiniteLossError, match=r"3 optimizer steps in a row .* record ids: \['[st]\d+'"
    ):
        run_steps(raw, before_train=Poison(nan_calls=set(range(1, 100))))


class _Counted(torch.utils.data.Dataset):
    """A sample dataset with LazySupervisedDataset's counter interface."""

    def __init__(self):
        self.counts: dict[str, int] = {"truncated_samples": 1}  # what building it read

    def __len__(self):
        return 3

    def __getitem__(self, i):
        return {"length": 1}

    def bad_record_stats(self):
        return {k: n for k, n in self.counts.items() if n}

    def _count(self, kind, n=1):
        self.counts[kind] = self.counts.get(kind, 0) + n


def test_fault_state_round_trip_through_a_packed_dataset(tmp_path):
    """Packed runs checkpoint and restore the sample dataset's counters; a run of non-finite steps survives."""
    from llava_train.data.packing import PackedDataset

    guard = faults.NonFiniteGuard(max_in_a_row=5)
    guard.skipped, guard.in_a_row = 4, 2
    packed = PackedDataset(_Counted(), [[0, 1], [2]], [1, 1, 1])
    packed._count("missing_image", 3)
    faults.save_fault_state(tmp_path, packed.bad_record_stats(), guard)
    fresh, restored = PackedDataset(_Counted(), [[0, 1], [2]], [1, 1, 1]), faults.NonFiniteGuard(5)
    assert faults.load_fault_state(tmp_path, fresh, restored) == {"missing_image": 3, "truncated_samples": 1}
    assert fresh.bad_record_stats() == {"missing_image": 3, "truncated_samples": 1}
    assert (restored.skipped, restored.in_a_row) == (4, 2)
    assert PackedDataset([{"length": 1}], [[0]], [1]).bad_record_stats() == {}  # a dataset without counters


# ---- pre-flight: bad run dir fails before training ----------------------------------------------------
class TrainBegan(TrainerCallback):
    began = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.began = True


def test_not_enough_disk_space_fails_before_training(data_json, tmp_path, monkeypatch):
    monkeypatch.setattr(faults.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    began = TrainBegan()
    with pytest.raises(OSError, match="not enough disk space .* one checkpoint needs about .* GiB"):
        run_steps(compose_config(overrides(data_json, tmp_path, max_steps=2)), callbacks=[began])
    assert not began.began and not list(tmp_path.glob("checkpoint-*"))


def test_checkpoint_size_estimate_counts_optimizer_state_and_stage():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10))  # 2 x 110 fp32 params
    model[0].requires_grad_(False)
    assert faults.checkpoint_bytes(model, full_model=False) == 110 * (4 + 8)
    assert faults.checkpoint_bytes(model, full_model=True) == 110 * (4 + 8) + 110 * 4


def test_unwritable_run_dir_fails_before_anything_is_built(data_json, tmp_path, monkeypatch):
    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(faults, "_probe_write", refuse)  # root ignores chmod; simulate a read-only mount
    with pytest.raises(PermissionError, match="is not writable .* point training.run_dir at a writable"):
        run_steps(compose_config(overrides(data_json, tmp_path / "run", max_steps=2)))
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_unwritable_run_dir_by_chmod(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="is not writable"):
            faults.check_writable(ro / "run")
    finally:
        ro.chmod(0o700)
