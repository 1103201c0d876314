"""Synthetic LLaVA-mix665k-like samples for the benchmarks (no tokenizer, no files).

The shape of llava_v1_5_mix665k: ~90% of records carry one image (a fixed number of feature tokens,
576 for CLIP-L/14-336), ~10% are text-only (ShareGPT, longer); text lengths are long-tailed (many
short VQA answers, some long multi-round conversations). Lengths are drawn log-normal and clipped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class Mix:
    """Length distribution: text tokens log-normal(median, sigma) clipped to [lo, hi]."""

    image_tokens: int = 576
    image_fraction: float = 0.9
    image_text_median: float = 110.0
    text_only_median: float = 450.0
    sigma: float = 0.8
    lo: int = 16
    hi: int = 1400


def text_length(rng: random.Random, median: float, mix: Mix) -> int:
    return int(min(max(math.exp(rng.gauss(math.log(median), mix.sigma)), mix.lo), mix.hi))


def lengths(n: int, mix: Mix, seed: int = 0) -> tuple[list[int], list[bool]]:
    """(exact model-side length, has_image) for ``n`` samples."""
    rng = random.Random(seed)
    out, has_image = [], []
    for _ in range(n):
        image = rng.random() < mix.image_fraction
        median = mix.image_text_median if image else mix.text_only_median
        out.append(text_length(rng, median, mix) + (mix.image_tokens if image else 0))
        has_image.append(image)
    return out, has_image


def samples(
    n: int, mix: Mix, vocab: int, image_side: int, seed: int = 0, max_length: int | None = None
) -> list[dict]:
    """Dataset-format samples (input_ids with one IMAGE_TOKEN_INDEX, labels on the reply, pixels [1, 3, S, S])."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        image = rng.random() < mix.image_fraction
        text = text_length(rng, mix.image_text_median if image else mix.text_only_median, mix)
        if max_length is not None:
            text = min(text, max_length - (mix.image_tokens if image else 0))
        ids = torch.randint(3, vocab, (text,), generator=gen)
        ids[0] = 1
        prompt = max(2, text // 4)
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        if image:
            ids = torch.cat([ids[:1], torch.tensor([IMAGE_TOKEN_INDEX]), ids[1:]])
            labels = torch.cat([labels[:1], torch.tensor([IGNORE_INDEX]), labels[1:]])
        out.append(
            {
                "input_ids": ids,
                "labels": labels,
                "images": torch.randn(1, 3, image_side, image_side, generator=gen) if image else None,
                "image_sizes": [(image_side, image_side)] if image else [],
                "sample_id": str(i),
                "length": text + (mix.image_tokens if image else 0),
            }
        )
    return out
