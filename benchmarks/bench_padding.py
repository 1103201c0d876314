"""Benchmark: fraction of pad tokens per batch for random order, length grouping, LLaVA's modality-length
grouping, and packing, on a synthetic mix665k-like length distribution (benchmarks/synthetic.py: 90% image
samples with 576 image tokens + long-tailed text, 10% longer text-only samples), model_max_length 2048.

Micro-batches of ``--batch`` samples (LLaVA-1.5 fine-tune: 16 per device, 8 devices); the samplers get the
exact lengths (their best case: in training they see estimates). Packing: first-fit-decreasing rows of
2048 tokens within each modality, 1 or ``--rows`` rows per micro-batch, padded to the longest row; and,
for static shapes, every row padded to the full 2048 (within modality, and with modalities mixed).

    .venv/bin/python benchmarks/bench_padding.py [--samples 50000]
"""

from __future__ import annotations

import argparse
import random

from common import table, write
from synthetic import Mix, lengths

from llava_train.data.packing import pack_lengths, padding_fraction
from llava_train.data.sampler import LengthGroupedSampler, ModalityLengthGroupedSampler


def chunks(order: list, size: int) -> list[list]:
    return [order[i : i + size] for i in range(0, len(order), size)]


def main(n: int = 50000, batch: int = 16, world: int = 8, rows: int = 2, max_length: int = 2048) -> dict:
    lens, has_image = lengths(n, Mix(hi=max_length - 576), seed=0)
    lens = [min(x, max_length) for x in lens]
    signed = [x if img else -x for x, img in zip(lens, has_image)]
    order = list(range(n))
    random.Random(0).shuffle(order)
    packs = pack_lengths(lens, max_length, [int(i) for i in has_image])  # within modality (default)
    mixed = pack_lengths(lens, max_length)  # text-only samples may fill gaps in image rows
    random.Random(0).shuffle(packs)
    strategies = {
        "random": chunks(order, batch),
        "length_grouped": chunks(list(LengthGroupedSampler(lens, batch, world)), batch),
        "modality_length_grouped": chunks(list(ModalityLengthGroupedSampler(signed, batch, world)), batch),
        "packed by modality, 1 row/batch": chunks(packs, 1),
        f"packed by modality, {rows} rows/batch": chunks(packs, rows),
    }
    results = []
    for name, batches in strategies.items():
        pad = padding_fraction(batches, lens)
        results.append(dict(strategy=name, micro_batches=len(batches), pad_fraction=round(pad, 4)))
    for name, bins in (("packed by modality", packs), ("packed mixed modality", mixed)):
        pad = 1 - sum(lens) / (len(bins) * max_length)
        results.append(
            dict(strategy=f"{name}, fixed {max_length}", micro_batches=len(bins), pad_fraction=round(pad, 4))
        )
    print(table(results, ["strategy", "micro_batches", "pad_fraction"]))
    config = dict(samples=n, batch=batch, world=world, rows_per_packed_batch=rows, max_length=max_length)
    stats = dict(
        mean_length=round(sum(lens) / n, 1), image_fraction=round(sum(has_image) / n, 3), packs=len(packs)
    )
    write("padding", dict(config=config, stats=stats, results=results))
    return {"results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2)
    a = parser.parse_args()
    main(a.samples, a.batch, rows=a.rows)
