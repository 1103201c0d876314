"""Run every benchmark (``make bench``), each in a fresh process, then print one summary against the goals.

Order matters: the pipeline benchmark compares against the train step's rate (train_step.json).
Results: benchmarks/out/*.json; documented in benchmarks/RESULTS.md. About 6-9 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/run_all.py [--only merge,padding]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, machine, out_dir, table

BENCHMARKS = {
    "merge": ["bench_merge.py"],
    "padding": ["bench_padding.py"],
    "train_step": ["bench_train_step.py"],
    "pipeline": ["bench_pipeline.py"],
    "memory": ["bench_memory.py"],
}


def run(name: str) -> float:
    """Run one benchmark script; its table goes to stdout. Returns seconds taken."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'benchmarks'}"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / BENCHMARKS[name][0])]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT / "benchmarks")
    return time.perf_counter() - start


def _load(name: str) -> dict | None:
    path = out_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary() -> list[dict]:
    """One row per goal: the measured figure and whether the goal is met."""
    rows = []
    merge = _load("merge")
    if merge:
        for r in merge["results"]:
            rows.append(
                dict(
                    goal=f"merge {r['case']} >= 10x loop",
                    figure=f"{r['speedup_median']}x",
                    met=r["speedup_median"] >= 10,
                )
            )
    step = _load("train_step")
    if step:
        by = {r["variant"]: r for r in step["results"]}
        rows.append(
            dict(
                goal="train step unpacked >= 1.0x HF",
                figure=f"{by['ours']['vs_hf']}x (CPU time {by['ours'].get('vs_hf_cpu')}x)",
                met=by["ours"].get("vs_hf_cpu", by["ours"]["vs_hf"]) >= 1.0,
            )
        )
        packed = [r for name, r in by.items() if name.startswith("ours_packed")]
        best = max(packed, key=lambda r: r.get("vs_hf_cpu", r["vs_hf"]))
        rows.append(
            dict(
                goal="train step packed >= 3.5x HF (issue 20), best packed path",
                figure=f"{best['variant']}: {best['vs_hf']}x (CPU time {best.get('vs_hf_cpu')}x)",
                met=best.get("vs_hf_cpu", best["vs_hf"]) >= 3.5,
            )
        )
    padding = _load("padding")
    if padding:
        for r in padding["results"]:
            if r["strategy"].startswith("packed"):
                rows.append(
                    dict(
                        goal=f"pad <= 5%: {r['strategy']}",
                        figure=f"{100 * r['pad_fraction']:.1f}%",
                        met=r["pad_fraction"] <= 0.05,
                    )
                )
    pipeline = _load("pipeline")
    if pipeline:
        for r in pipeline["results"]:
            if "headroom" in r:
                rows.append(
                    dict(
                        goal=f"pipeline {r['aspect']} w={r['workers']} >= 3x step",
                        figure=f"{r['headroom']}x",
                        met=r["headroom"] >= 3,
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset")
    names = parser.parse_args().only.split(",")
    print("machine:", machine())
    took = {name: round(run(name), 1) for name in names}
    print("\n=== summary (seconds per benchmark:", took, ")")
    print(table(summary(), ["goal", "figure", "met"]))
    print("machine after:", machine())


if __name__ == "__main__":
    main()
