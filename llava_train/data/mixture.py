"""YAML data mixtures (LLaVA-NeXT style): several files, each with a sampling strategy.

    datasets:
      - json_path: llava_v1_5_mix665k.json      # or `path`; .json or .jsonl
        sampling_strategy: all                   # all | first:N | end:N | random:N | random:10%
        image_folder: /data/images               # optional; default: DataConfig.image_folder

``random`` draws are seeded (DataConfig.seed + the entry's position), so a mixture is reproducible.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from llava_train.data.sources import ConcatSource, RecordSource, SubsetSource, file_source


def sample_indices(strategy: str, n: int, seed: int) -> list[int]:
    """Indices of ``n`` records kept by ``strategy`` (all, first:N, end:N, random:N, N may be 'P%')."""
    if strategy in ("", "all"):
        return list(range(n))
    kind, _, amount = strategy.partition(":")
    if kind not in ("first", "end", "random") or not amount:
        raise ValueError(f"sampling_strategy {strategy!r}; use all, first:N, end:N, random:N or random:P%")
    k = round(n * float(amount[:-1]) / 100) if amount.endswith("%") else int(amount)
    k = max(0, min(k, n))
    if kind == "first":
        return list(range(k))
    if kind == "end":
        return list(range(n - k, n))
    return sorted(random.Random(seed).sample(range(n), k))


def mixture_source(
    path: str,
    default_image_folder: str = "",
    seed: int = 0,
    cache_dir: str | None = None,
    bad_record_policy: str = "strict",
) -> RecordSource:
    """A ConcatSource over the mixture's entries; relative json paths resolve against the YAML's folder."""
    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f)
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not entries:
        raise ValueError(
            f"{path}: a mixture needs a non-empty `datasets:` list of {{json_path, sampling_strategy}}"
        )
    sources = []
    for i, entry in enumerate(entries):
        file = entry.get("json_path") or entry.get("path")
        if not file:
            raise ValueError(f"{path}: entry {i} has no json_path")
        file_path = Path(file) if Path(file).is_absolute() else Path(path).parent / file
        folder = entry.get("image_folder") or default_image_folder
        source = file_source(file_path, folder, cache_dir, bad_record_policy)
        keep = sample_indices(str(entry.get("sampling_strategy", "all")), len(source), seed + i)
        sources.append(source if len(keep) == len(source) else SubsetSource(source, keep))
    return ConcatSource(sources)
