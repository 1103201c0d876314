"""Smoke tests: every benchmark runs end to end at tiny sizes and writes its JSON (no timing asserts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """Import path for benchmarks/, results written under tmp_path (not over benchmarks/out)."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("LLAVA_BENCH_OUT", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{BENCH.parent}:{BENCH}")
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("bench_")]:
        sys.modules.pop(name)


def _read(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_bench_merge_identical_output(bench):
    import bench_merge

    bench_merge.main(repeats=1)
    results = _read(bench, "merge")["results"]
    assert len(results) == 3 and all(r["identical"] for r in results)


def test_bench_padding(bench):
    import bench_padding

    bench_padding.main(n=2000)
    rows = {r["strategy"]: r["pad_fraction"] for r in _read(bench, "padding")["results"]}
    assert rows["packed by modality, 1 row/batch"] == 0.0
    assert rows["random"] > rows["modality_length_grouped"]


def test_bench_train_step_quick(bench):
    import bench_train_step

    bench_train_step.main(n=4, batch=2, rows=1, max_length=512, repeats=1, quick=True, max_repeats=2)
    out = _read(bench, "train_step_quick")
    variants = [r["variant"] for r in out["results"]] + list(out["skipped"])  # flex: timed on CUDA only
    assert variants[:6] == [
        "hf",
        "ours",
        "ours_packed",
        "ours_packed_sdpa_varlen",
        "ours_sdpa_varlen",
        "ours_packed_eager",
    ]
    assert "ours_packed_flex_attention" in variants and out["rounds"] <= 2


def test_bench_pipeline(bench):
    import bench_pipeline

    bench_pipeline.main(n=6, batch=2)
    assert len(_read(bench, "pipeline")["results"]) == 4


def test_bench_memory_tiny(bench):
    import bench_memory

    bench_memory.main(steps=1, models=("tiny",))
    stages = [r["stage"] for r in _read(bench, "memory")["results"]]
    assert stages == ["pretrain", "finetune_lora", "finetune"]
