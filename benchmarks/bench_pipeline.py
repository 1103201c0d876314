"""Benchmark: data pipeline samples/s (dataset __getitem__ + DataCollator through a DataLoader).

A JSONL of LLaVA records, each with one JPEG image (half 672x672, half 1008x336) and one or two rounds;
the CLIP-336 processor; ``pad`` (one 336 crop per image) and ``anyres`` (LLaVA-1.6 pinpoints: base + 4 or
3 crops); 0 and 2 DataLoader workers; the mistral tokenizer (offline). The first batch (worker start-up)
is not timed. The train step's consumption rate is read from benchmarks/out/train_step.json (our
unpacked step, samples per second) when present: ``headroom`` = pipeline rate / train step rate.

    .venv/bin/python benchmarks/bench_pipeline.py [--samples 64 --batch 8]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from common import out_dir, table, write

from llava_train.data import DataCollator, DataConfig, VisionSpec, build_dataset
from llava_train.data.image import build_image_processor
from llava_train.data.tokenizers import ensure_pad_token, load_tokenizer

PINPOINTS = "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]"
SIZES = [(672, 672), (1008, 336)]


def write_data(folder: Path, n: int) -> Path:
    """n records alternating the two image sizes; JPEG noise images (realistic decode cost)."""
    from PIL import Image

    rng = random.Random(0)
    (folder / "img").mkdir()
    for k, (w, h) in enumerate(SIZES):
        pixels = torch.randint(
            0, 256, (h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(k)
        )
        Image.fromarray(pixels.numpy()).save(folder / "img" / f"{k}.jpg", quality=90)
    path = folder / "data.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(["what", "is", "in", "the", "image", "color"]) for _ in range(20))
            turns = [{"from": "human", "value": "<image>\n" + words}, {"from": "gpt", "value": words * 2}]
            if i % 2:
                turns += [{"from": "human", "value": words}, {"from": "gpt", "value": words}]
            f.write(json.dumps({"id": str(i), "image": f"{i % 2}.jpg", "conversations": turns}) + "\n")
    return path


def rate(dataset, tokenizer, batch: int, workers: int) -> float:
    """Samples/s over all batches but the first."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, num_workers=workers, collate_fn=DataCollator(tokenizer), shuffle=False
    )
    it = iter(loader)
    next(it)
    start, count = time.perf_counter(), 0
    for b in it:
        count += len(b["sample_ids"])
    return count / (time.perf_counter() - start)


def train_step_rate() -> float | None:
    """Samples/s of our unpacked train step from the train-step benchmark, if it was run."""
    path = out_dir() / "train_step.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    ours = next(r for r in data["results"] if r["variant"] == "ours")
    return data["config"]["samples"] / ours["epoch_s"]


def main(n: int = 64, batch: int = 8) -> dict:
    tokenizer = load_tokenizer("mistral")
    ensure_pad_token(tokenizer)
    processor = build_image_processor(336)
    consume = train_step_rate()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data(Path(tmp), n)
        for aspect, merge in (("pad", "flat"), ("anyres", "spatial_unpad")):
            cfg = DataConfig(
                data_path=str(path),
                image_folder=str(Path(tmp) / "img"),
                template="vicuna_v1",
            )
            vision = VisionSpec(
                mm_patch_merge_type=merge,
                image_aspect_ratio=aspect,
                image_grid_pinpoints=PINPOINTS if aspect == "anyres" else None,
                model_max_length=8192,
            )
            dataset = build_dataset(cfg, tokenizer, processor, vision)
            for workers in (0, 2):
                r = rate(dataset, tokenizer, batch, workers)
                row = dict(aspect=aspect, workers=workers, samples_s=round(r, 1))
                if consume:
                    row["train_step_samples_s"] = round(consume, 2)
                    row["headroom"] = round(r / consume, 1)
                results.append(row)
    print(table(results, ["aspect", "workers", "samples_s", "train_step_samples_s", "headroom"]))
    write("pipeline", dict(config=dict(samples=n, batch=batch, image_sizes=SIZES), results=results))
    return {"results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    a = parser.parse_args()
    main(a.samples, a.batch)
