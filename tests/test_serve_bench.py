"""benchmarks/bench_serve.py runs end to end at a tiny size and writes its JSON (no timing asserts)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytest.importorskip("openai")


@pytest.mark.slow  # ~60 s here: a model built and two server modes, each warmed up
def test_bench_serve_smoke(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setenv("LLAVA_BENCH_OUT", str(tmp_path))
    import bench_serve

    try:
        bench_serve.main(concurrency=(1, 3), requests_per_client=1, max_tokens=2, rounds=1, min_requests=1)
    finally:
        sys.modules.pop("bench_serve", None)
    rows = json.loads((tmp_path / "serve.json").read_text())["results"]
    assert [(r["mode"], r["clients"]) for r in rows] == [
        ("one-at-a-time", 1),
        ("one-at-a-time", 3),
        ("batched", 1),
        ("batched", 3),
    ]
    assert rows[1]["mean_batch"] == 1.0 and all(r["req_per_s"] > 0 for r in rows)
