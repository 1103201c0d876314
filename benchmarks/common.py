"""Shared benchmark helpers: interleaved repeated timing, machine load, JSON results, printed tables.

Timings on a shared CPU are noisy: every benchmark runs its variants *interleaved* (A B A B ...) after
a warm-up, reports min and median of the repeats, and records the load average next to the figures.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Time each fn ``repeats`` times, interleaved, after ``warmup`` untimed rounds: {name: {min, median} ms}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {
        k: {"min_ms": round(min(v), 3), "median_ms": round(statistics.median(v), 3)} for k, v in times.items()
    }


def machine() -> dict[str, Any]:
    """What the figures were measured on: torch, threads, cores, load average."""
    return dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
        loadavg=[round(x, 2) for x in os.getloadavg()],
        device="cpu",
    )


def out_dir() -> Path:
    """benchmarks/out, or $LLAVA_BENCH_OUT (the smoke tests write there, not over the real figures)."""
    return Path(os.environ.get("LLAVA_BENCH_OUT", OUT))


def write(name: str, payload: dict) -> Path:
    """<out_dir>/<name>.json with the machine description added."""
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"meta": machine(), **payload}, indent=2))
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``columns``."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
