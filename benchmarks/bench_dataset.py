"""Dataset start-up time and peak memory on a synthetic LLaVA-665k-sized file (JSON and JSONL).

    .venv/bin/python benchmarks/bench_dataset.py [--records 665000]   # -> benchmarks/out/dataset.json

Each format is measured in a fresh process: peak RSS is the process high-water mark minus the RSS after
imports (torch, transformers tokenizer). Reported: open time (build_dataset), time to compute the
sampler length estimates over all records, __getitem__ throughput (tokenise + image load + pad), and
the per-record cost of ``exact_lengths()`` (tokens + image header, what packing needs) against it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _record(i: int, rng: random.Random) -> dict:
    """A record shaped like llava_v1_5_mix665k (most with an image, 1-6 rounds)."""
    turns = []
    for r in range(rng.randint(1, 6)):
        question = " ".join(
            rng.choice(["what", "is", "the", "color", "of", "this", "object", "in", "image"])
            for _ in range(12)
        )
        turns += [
            {"from": "human", "value": ("<image>\n" if r == 0 and i % 10 else "") + question},
            {"from": "gpt", "value": " ".join(["answer"] * rng.randint(1, 60))},
        ]
    record = {"id": f"{i:012d}", "conversations": turns}
    if i % 10:
        record["image"] = "a.png"
    return record


def write_files(folder: Path, n: int) -> tuple[Path, Path]:
    from PIL import Image

    rng = random.Random(0)
    records = [_record(i, rng) for i in range(n)]
    (folder / "img").mkdir(exist_ok=True)
    Image.new("RGB", (640, 480), (120, 30, 200)).save(folder / "img" / "a.png")
    json_path, jsonl_path = folder / "data.json", folder / "data.jsonl"
    json_path.write_text(json.dumps(records))
    with open(jsonl_path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return json_path, jsonl_path


def _status_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def child(path: str) -> None:
    """Measure one file in this (fresh) process and print a JSON line."""
    from llava_train.data import DataConfig, VisionSpec, build_dataset
    from llava_train.data.image import build_image_processor
    from llava_train.data.tokenizers import load_tokenizer

    tokenizer, processor = load_tokenizer("mistral"), build_image_processor(336)
    base = _rss_mb()
    start = time.perf_counter()
    cfg = DataConfig(data_path=path, image_folder=str(Path(path).parent / "img"))
    ds = build_dataset(cfg, tokenizer, processor, VisionSpec(model_max_length=4096))
    opened = time.perf_counter() - start
    start = time.perf_counter()
    ds = build_dataset(
        cfg, tokenizer, processor, VisionSpec(model_max_length=4096)
    )  # now from its JSONL cache
    reopened = time.perf_counter() - start
    rss_open = _rss_mb() - base
    start = time.perf_counter()
    lengths = ds.modality_lengths
    lengths_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(200):
        ds[i * 997 % len(ds)]
    per_item_ms = (time.perf_counter() - start) / 200 * 1e3
    start = time.perf_counter()  # what exact_lengths() (packing) pays per record: tokens + image header
    for i in range(2000):
        ds._exact_length_of(i * 997 % len(ds))
    exact_ms = (time.perf_counter() - start) / 2000 * 1e3
    peak = _status_mb("VmHWM") - base  # ru_maxrss would include the parent's high-water mark
    print(
        json.dumps(
            {
                "records": len(ds),
                "open_s": round(opened, 2),
                "reopen_s": round(reopened, 2),
                "rss_after_open_mb": round(rss_open, 1),
                "lengths_s": round(lengths_s, 2),
                "peak_rss_over_baseline_mb": round(peak, 1),
                "getitem_ms": round(per_item_ms, 2),
                "exact_length_ms": round(exact_ms, 3),
                "exact_lengths_all_s": round(exact_ms * len(ds) / 1e3, 1),
                "getitem_all_s": round(per_item_ms * len(ds) / 1e3, 1),
                "multimodal_records": sum(1 for x in lengths if x > 0),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    OUT.mkdir(exist_ok=True)
    results = {"records": args.records}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LLAVA_TRAIN_CACHE"] = str(Path(tmp) / "cache")  # a cold JSON index cache
        start = time.perf_counter()
        paths = write_files(Path(tmp), args.records)
        results["write_s"] = round(time.perf_counter() - start, 1)
        for path in paths:
            results["file_mb_" + path.suffix[1:]] = round(path.stat().st_size / 2**20, 1)
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(path)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            results[path.suffix[1:]] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(path.suffix, results[path.suffix[1:]], flush=True)
    (OUT / "dataset.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
