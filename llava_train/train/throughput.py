"""The rates logged every `logging_steps` from flops.py's counts: tokens/s, TFLOP/s, MFU and HFU per device,
against a peak from `training.peak_tflops`, a table of 16-bit GPU peaks, or a timed matmul; also appended to
run_dir/throughput.jsonl."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from llava_train.train.flops import Flops

THROUGHPUT_FILE = "throughput.jsonl"
# Dense bf16 / fp16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(); first match.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def measured_matmul_tflops(
    device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 5
) -> float:
    """Dense matmul rate of ``device`` in ``dtype``: the best of ``repeats`` timed n x n x n products, TFLOP/s."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def peak_tflops(configured: float | None, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from): the config, the 16-bit table, or a measured rate."""
    if configured is not None:
        return configured, "config"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS_16BIT.items():
            if key in name:
                return value, f"table:{key}"
    n = 8192 if device.type == "cuda" else 1024
    return measured_matmul_tflops(
        device, dtype, n=n
    ), f"measured:{device.type}:{str(dtype).removeprefix('torch.')}"


class ThroughputMeter:
    """FLOPs and tokens since the last log; the figures of one logging interval, and their JSONL file."""

    def __init__(self, peak: float, source: str, world_size: int = 1):
        self.peak, self.source, self.world_size = peak, source, world_size
        self.interval = Flops()
        self.start = time.perf_counter()

    def restart(self) -> None:
        self.interval, self.start = Flops(), time.perf_counter()

    def figures(self, totals: Sequence[float], seconds: float) -> dict[str, float]:
        """``totals`` = (tokens, model FLOPs, hardware FLOPs) summed over ranks; per-device rates."""
        tokens, model, hardware = totals
        per_device = model / self.world_size / seconds / 1e12
        return {
            "tokens_per_second": tokens / seconds,
            "tflops": per_device,
            "mfu": per_device / self.peak,
            "hfu": hardware / self.world_size / seconds / 1e12 / self.peak,
        }

    def write(self, run_dir: str | Path, step: int, seconds: float, figures: dict[str, float]) -> None:
        row = {"step": step, "seconds": round(seconds, 4), **figures, "peak_tflops": self.peak}
        row["peak_source"] = self.source
        with open(Path(run_dir) / THROUGHPUT_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
