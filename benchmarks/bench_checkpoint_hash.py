"""What the reliability checks cost: SHA-256 of checkpoint files, and the JSONL scan that parses every line.

    .venv/bin/python benchmarks/bench_checkpoint_hash.py [--mib 1024] [--records 200000]
    # -> benchmarks/out/checkpoint_hash.json

1. Checkpoint hashing (llava_train/train/manifest.py): files of `--mib` MiB in all, written, then hashed from
   the page cache (as at save, before the rename) on one thread and on the manifest's thread pool; the rate
   projects the cost on a 7B checkpoint (full fine-tune: bf16 weights 13.5 GB + DeepSpeed's bf16 module copy
   13.5 GB + fp32 master 27 GB + Adam moments 54 GB = 108 GB; LoRA r=128: ~0.7 GB).
2. JSONL open (llava_train/data/sources.py): the validating scan (each line parsed once) against a bare
   offset scan, on a synthetic LLaVA-shaped file; `open_ratio` = validating / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dataset import _record  # noqa: E402

from llava_train.data.sources import JsonlSource  # noqa: E402
from llava_train.train.manifest import content_manifest, file_digest  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
CHECKPOINT_7B_GB = {"full_finetune_zero": 108.0, "lora_r128": 0.7}


def bench_hash(root: Path, mib: int) -> dict:
    files = 4
    for i in range(files):
        (root / f"shard{i}.bin").write_bytes(os.urandom(mib // files << 20))
    start = time.perf_counter()
    for i in range(files):
        file_digest(root / f"shard{i}.bin")
    one = time.perf_counter() - start
    start = time.perf_counter()
    content_manifest(root)
    pool = time.perf_counter() - start
    rate_one, rate_pool = mib / 1024 / one, mib / 1024 / pool
    return {
        "mib": mib,
        "gib_per_s_one_thread": round(rate_one, 3),
        "gib_per_s_thread_pool": round(rate_pool, 3),
        "cpus": len(os.sched_getaffinity(0)),
        "seconds_7b": {k: round(gb / 1.074 / rate_pool, 1) for k, gb in CHECKPOINT_7B_GB.items()},
    }


def _bare_offsets(path: str) -> array:
    offsets, pos = array("q"), 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


def bench_scan(root: Path, records: int) -> dict:
    rng = random.Random(0)
    path = root / "data.jsonl"
    with open(path, "w") as f:
        for i in range(records):
            f.write(json.dumps(_record(i, rng)) + "\n")
    size = path.stat().st_size
    _bare_offsets(str(path))  # warm the page cache
    start = time.perf_counter()
    _bare_offsets(str(path))
    bare = time.perf_counter() - start
    start = time.perf_counter()
    JsonlSource(path)
    validating = time.perf_counter() - start
    return {
        "records": records,
        "mib": round(size / 2**20, 1),
        "bare_scan_s": round(bare, 3),
        "validating_scan_s": round(validating, 3),
        "open_ratio": round(validating / bare, 2),
        "validating_mib_per_s": round(size / 2**20 / validating, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--records", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"hash": bench_hash(Path(tmp), args.mib), "jsonl_scan": bench_scan(Path(tmp), args.records)}
    OUT.mkdir(exist_ok=True)
    (OUT / "checkpoint_hash.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
