"""Multimodal sequence packing: several samples per row, no attention or labels across samples.

Notation: b rows, s packed row length (input tokens, image placeholders not yet expanded), k samples
in one row, T merged length (image feature tokens expanded, <= max_length).

How it works, end to end:

1. ``pack_lengths`` bins samples into rows with first-fit-decreasing on their *exact* lengths (text
   tokens + every image's feature tokens, ``anyres.num_image_tokens``: what the model really sees), so
   no row exceeds ``max_length`` after the merge. With ``modalities`` it packs each modality group
   separately, so every row (and, through the sampler, every global batch) is single-modality.
2. ``PackedDataset`` wraps a dataset: item ``i`` is the list of samples of pack ``i``. It exposes
   ``lengths`` / ``modality_lengths`` of the packs, so ``data.sampler.build_sampler`` and the Trainer's
   default sampler work on it unchanged; nothing is rank-specific (DeepSpeed / accelerate shard the
   stream of pack indices like any other dataset).
3. ``PackingCollator`` concatenates the samples of each pack into one row, pads rows on the right, and
   adds ``seq_ids`` [b, s] long: 1..k for the samples of a row, 0 for padding. The first label of each
   sample is set to IGNORE_INDEX: in an unpacked row nothing predicts token 0, and in a packed row
   that label would be predicted from the previous sample's last token.
4. The model (``LlavaLlamaForCausalLM.forward(seq_ids=...)``) expands ``seq_ids`` over image feature
   tokens in the merge, restarts position ids at every sample, and blocks attention across samples:
   a block-diagonal causal 4D mask for sdpa / eager, position-id packing (varlen) for flash attention.

Packing is computed once from the lengths (deterministic); epochs reshuffle the order of packs.

Trainer wiring (``data.packing=true``)::

    dataset = build_packed_dataset(dataset, vision.model_max_length,
                                   by_modality=cfg.data.group_by_modality_length)
    collator = PackingCollator(tokenizer, max_length=vision.model_max_length)
    # per_device_train_batch_size now counts packed rows (1-2); build_sampler(dataset, ...) works on the
    # packs; count_supervised_tokens needs no change (each sample's first label is IGNORE_INDEX).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from llava_train.constants import IGNORE_INDEX
from llava_train.data.collator import DataCollator

logger = logging.getLogger(__name__)


def pack_lengths(
    lengths: Sequence[int], max_length: int, modalities: Sequence[int] | None = None
) -> list[list[int]]:
    """First-fit-decreasing bins of sample indices, each bin's total length <= ``max_length``.

    Args:
        lengths: exact per-sample length (image feature tokens included), all > 0.
        max_length: row capacity (model_max_length).
        modalities: optional group label per sample (e.g. 1 with image, 0 text-only); samples of
            different groups never share a row.

    Returns:
        Bins (lists of indices, longest sample first); bins of one group are contiguous.
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} sample(s) are longer than max_length={max_length} (first: index {too_long[0]}, "
            f"{lengths[too_long[0]]} tokens): truncate them in the dataset (model.model_max_length) first"
        )
    groups: dict[int, list[int]] = {}
    for i in range(len(lengths)):
        groups.setdefault(0 if modalities is None else int(modalities[i]), []).append(i)
    bins: list[list[int]] = []
    for key in sorted(groups, reverse=True):
        bins += _first_fit_decreasing(groups[key], lengths, max_length)
    return bins


def _first_fit_decreasing(indices: list[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """FFD with a segment tree over the bins' free space: O(n log n) instead of O(n * bins)."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    size = 1
    while size < max(len(order), 1):
        size *= 2
    free = [0] * (2 * size)  # max free space per subtree; leaves are bins (unopened bins: capacity)
    for leaf in range(size):
        free[size + leaf] = capacity
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    bins: list[list[int]] = []
    for i in order:
        node = 1
        while node < size:  # leftmost bin with enough room
            node = 2 * node if free[2 * node] >= lengths[i] else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(i)
        free[node] -= lengths[i]
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def exact_lengths(dataset: Dataset, num_workers: int = 0) -> list[int]:
    """Exact per-sample lengths: ``dataset.exact_lengths`` if the dataset provides it, else ``sample["length"]``.

    ``LazySupervisedDataset.exact_lengths`` reads tokens and image headers only, and caches the result.
    The fallback, for other datasets, builds every sample (tokenise + load and process images) once,
    through a DataLoader with ``num_workers`` workers.
    """
    precomputed = getattr(dataset, "exact_lengths", None)
    if precomputed is not None:
        return list(precomputed(num_workers=num_workers) if callable(precomputed) else precomputed)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_length_of)
    lengths = list(loader)
    if any(n is None for n in lengths):
        raise ValueError(
            "packing needs sample['length'] (exact tokens incl. image features) from the dataset"
        )
    return lengths


def _length_of(sample: dict[str, Any]) -> int | None:
    return sample.get("length")


class PackedDataset(Dataset):
    """A dataset of packs: item ``i`` is the list of samples of pack ``i`` (see the module docstring).

    Args:
        dataset: the sample dataset (LazySupervisedDataset or any map-style dataset of sample dicts).
        packs: lists of sample indices (``pack_lengths``).
        lengths: exact per-sample lengths (to report pack lengths to samplers).
        modalities: per-sample group (1 with image, 0 text-only) or None.
    """

    def __init__(
        self,
        dataset: Dataset,
        packs: list[list[int]],
        lengths: Sequence[int],
        modalities: Sequence[int] | None = None,
    ):
        self.dataset, self.packs = dataset, packs
        self._lengths = [sum(lengths[i] for i in p) for p in packs]
        self._image = [bool(modalities[p[0]]) if modalities is not None else True for p in packs]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> list[dict[str, Any]]:
        pack = self.packs[index]
        take = getattr(self.dataset, "pack_samples", None)  # drops bad records (LazySupervisedDataset)
        return take(pack) if take is not None else [self.dataset[i] for i in pack]

    # The sample dataset's bad-record counters (checkpointed by the trainer; {} if it keeps none).
    def bad_record_stats(self) -> dict[str, int]:
        stats = getattr(self.dataset, "bad_record_stats", None)
        return stats() if stats is not None else {}

    def _count(self, kind: str, n: int = 1) -> None:
        if hasattr(self.dataset, "_count"):
            self.dataset._count(kind, n)

    @property
    def lengths(self) -> list[int]:
        """Total exact length of each pack."""
        return self._lengths

    @property
    def modality_lengths(self) -> list[int]:
        """Pack length, negative for text-only packs (LLaVA's sampler convention)."""
        return [n if img else -n for n, img in zip(self._lengths, self._image)]


def build_packed_dataset(
    dataset: Dataset,
    max_length: int,
    by_modality: bool = True,
    lengths: Sequence[int] | None = None,
    num_workers: int = 0,
) -> PackedDataset:
    """The trainer's entry point: dataset (+ exact lengths) -> PackedDataset of first-fit-decreasing packs.

    Modalities come from ``dataset.modality_lengths`` (negative = text-only) when ``by_modality``.
    """
    lengths = list(lengths) if lengths is not None else exact_lengths(dataset, num_workers)
    if len(lengths) != len(dataset):
        raise ValueError(
            f"{len(lengths)} lengths for {len(dataset)} samples; give one exact length per sample"
        )
    modalities = None
    if by_modality:
        modalities = [int(n > 0) for n in dataset.modality_lengths]
    packs = pack_lengths(lengths, max_length, modalities)
    fill = sum(lengths) / max(len(packs) * max_length, 1)
    logger.info(
        "packing: %d samples -> %d rows of %d tokens (%.1f%% full)",
        len(lengths),
        len(packs),
        max_length,
        100 * fill,
    )
    return PackedDataset(dataset, packs, lengths, modalities)


class PackingCollator:
    """Collate packs (lists of samples) into packed rows: the DataCollator batch plus ``seq_ids``.

    Output: the keys of :class:`DataCollator` (input_ids / labels / attention_mask [b, s], images and
    image_sizes of all samples in row order, sample_ids of all samples) plus seq_ids [b, s] long
    (1..k per sample within a row, 0 on padding). Rows are right-padded.

    Args:
        tokenizer_or_pad_id: a tokenizer (its pad_token_id) or the pad id.
        max_length: if given, each row's exact length (sum of ``sample["length"]``) is checked against it.
    """

    def __init__(self, tokenizer_or_pad_id: Any, max_length: int | None = None):
        self.base = DataCollator(tokenizer_or_pad_id, padding_side="right")
        self.max_length = max_length

    def __call__(self, packs: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
        packs = [[p] if isinstance(p, dict) else p for p in packs]  # plain samples: one per row
        rows = [self._concat(pack) for pack in packs]
        batch = self.base(rows)
        batch["seq_ids"] = self.base._pad([r["seq_ids"] for r in rows], 0)  # [b, s]
        batch["sample_ids"] = [sid for r in rows for sid in r["sample_ids"]]
        return batch

    def _concat(self, pack: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One row: samples concatenated, first label of each sample ignored, images in order."""
        self._check_length(pack)
        labels = [s["labels"].clone() for s in pack]
        for lab in labels:
            lab[:1] = IGNORE_INDEX  # predicted from the previous sample's last token otherwise
        images = [s["images"] for s in pack if s.get("images") is not None and len(s["images"])]
        if images and not isinstance(images[0], (list, tuple)):
            images = [torch.cat(images)]  # pad / square: [n_img, 3, S, S] of the row
        elif images:
            images = [[img for part in images for img in part]]  # anyres: list of [1 + crops, 3, S, S]
        seq = [torch.full((len(s["input_ids"]),), k + 1, dtype=torch.long) for k, s in enumerate(pack)]
        return {
            "input_ids": torch.cat([s["input_ids"] for s in pack]),  # [s]
            "labels": torch.cat(labels),  # [s]
            "seq_ids": torch.cat(seq),  # [s]
            "images": images[0] if images else None,
            "image_sizes": [tuple(size) for s in pack for size in (s.get("image_sizes") or [])],
            "sample_ids": [str(s.get("sample_id", "")) for s in pack],
            "sample_id": ",".join(str(s.get("sample_id", "")) for s in pack),
        }

    def _check_length(self, pack: Sequence[dict[str, Any]]) -> None:
        if self.max_length is None or any("length" not in s for s in pack):
            return
        total = sum(int(s["length"]) for s in pack)
        if total > self.max_length:
            raise ValueError(
                f"packed row {[s.get('sample_id') for s in pack]} is {total} tokens > max_length={self.max_length}: "
                "the lengths given to build_packed_dataset are not the samples' exact lengths; recompute them"
            )


def padding_fraction(batches: Sequence[Sequence[Any]], lengths: Sequence[int]) -> float:
    """Pad tokens / all tokens over ``batches`` of rows padded to the longest; a row is one index or a list."""
    pad = total = 0
    for batch in batches:
        rows = [sum(lengths[i] for i in r) if isinstance(r, (list, tuple)) else lengths[r] for r in batch]
        width = max(rows)
        pad += sum(width - n for n in rows)
        total += width * len(rows)
    return pad / max(total, 1)
