"""`make demo` end to end in smoke mode: every step of launch/demo.py runs on a small demo set."""

import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_runs_every_step(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    build = [
        sys.executable,
        "data/build_demo.py",
        "--out",
        str(data),
        "--stage1",
        "64",
        "--stage2",
        "64",
        "--llm-texts",
        "512",
    ]
    subprocess.run([*build, "--eval", "12"], cwd=ROOT, check=True)
    subprocess.run(
        [sys.executable, "launch/demo.py", "--quick", "--data", str(data), "--out", str(out), "--seed", "3"],
        cwd=ROOT,
        check=True,
        env={"PATH": "/usr/bin:/bin", "WANDB_MODE": "disabled", "HOME": str(Path.home())},
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["n"] == 12
    assert 0.0 <= metrics["overall"]["accuracy"] <= 1.0
    assert {"single_digit", "composite"} <= set(metrics)
    assert metrics["tower_pretrain"]["n_val"] > 0 and 0.0 <= metrics["tower_pretrain"]["val_accuracy"] <= 1.0
    assert metrics["llm_pretrain"]["steps"] == 3 and 0.0 <= metrics["llm_pretrain"]["accuracy"] <= 1.0
    pretrain = json.loads((out / "base" / "pretrain.json").read_text())
    assert set(pretrain) == {"tower", "llm"} and not (out / "base" / "llm_pretrain.safetensors").exists()
    for path in ("stage1/mm_projector.safetensors", "stage2/model.safetensors", "hf/config.json"):
        assert (out / path).is_file(), path
    assert len((out / "answers.jsonl").read_text().splitlines()) == 12
    for stage in ("stage1", "stage2"):  # --seed reaches both training runs
        assert OmegaConf.load(out / stage / "config.yaml").training.seed == 3, stage


def test_summary_of_an_eval_set_without_composite_questions(capsys, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_launcher", ROOT / "launch" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    metrics = {"per_category": {"digit": {"accuracy": 0.5, "n": 4}}, "overall": {"accuracy": 0.5, "n": 4}}
    metrics.update(demo.composite_split(metrics))
    assert metrics["single_digit"] == 0.5 and "composite" not in metrics
    demo.summarise(metrics, tmp_path)
    assert "single_digit" in capsys.readouterr().out
