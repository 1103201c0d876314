"""Samplers for the HF Trainer: length grouping and LLaVA's modality-length grouping.

Both build *global batches* (mega-batches) of ``batch_size * world_size * grad_accum`` indices, sort
each by length so micro-batches hold similar lengths (less padding), and shuffle the order of
mega-batches; everything is seeded by ``seed + epoch`` (``set_epoch``), identical on every rank. The
sampler yields one flat index list that the Trainer / accelerate cut into per-rank micro-batches, so a
mega-batch is exactly one optimizer step across all ranks.

ModalityLengthGroupedSampler keeps every global batch single-modality (all with image, or all
text-only): the last, partial mega-batch of each modality is filled up with repeats of that modality
(like DistributedSampler's padding) instead of being mixed, as the original does. With one modality only
it is plain length grouping (the original crashes there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _megabatches(
    indices: list[int], lengths: Sequence[int], size: int, generator: torch.Generator
) -> list[list[int]]:
    """Shuffle ``indices``, cut into mega-batches of ``size`` (last one filled by repeats), sort each by length."""
    order = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
    if not order:
        return []
    shortfall = -len(order) % size
    order += [order[i % len(order)] for i in range(shortfall)]  # fill the last global batch, same modality
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    return [sorted(b, key=lambda i: -abs(lengths[i])) for b in batches]


class LengthGroupedSampler(Sampler[int]):
    """Shuffled mega-batches of similar-length samples (see module docstring).

    Args:
        lengths: estimated length per record (dataset.lengths; sign ignored).
        batch_size: per-device micro-batch size.
        world_size, grad_accum: ranks and gradient-accumulation steps (a global batch spans both).
        seed: base seed; the epoch is added (set_epoch).
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, world_size: int = 1, grad_accum: int = 1, seed: int = 0
    ):
        if batch_size < 1 or world_size < 1 or grad_accum < 1:
            raise ValueError(
                f"batch_size={batch_size}, world_size={world_size}, grad_accum={grad_accum} must be >= 1"
            )
        self.lengths = list(lengths)
        self.megabatch = batch_size * world_size * grad_accum
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def _groups(self) -> list[list[int]]:
        """Index groups sampled separately (one here: all records)."""
        return [list(range(len(self.lengths)))]

    def _global_batches(self) -> list[list[int]]:
        generator = self._generator()
        batches = [
            b for g in self._groups() if g for b in _megabatches(g, self.lengths, self.megabatch, generator)
        ]
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self._global_batches() for i in batch])

    def __len__(self) -> int:
        return sum(-(-len(g) // self.megabatch) * self.megabatch for g in self._groups() if g)


class ModalityLengthGroupedSampler(LengthGroupedSampler):
    """Length grouping within each modality; every global batch is single-modality.

    ``lengths`` are dataset.modality_lengths: positive with image(s), negative text-only.
    """

    def _groups(self) -> list[list[int]]:
        multimodal = [i for i, n in enumerate(self.lengths) if n > 0]
        text_only = [i for i, n in enumerate(self.lengths) if n <= 0]
        return [multimodal, text_only]


def build_sampler(
    dataset,
    batch_size: int,
    world_size: int = 1,
    grad_accum: int = 1,
    seed: int = 0,
    by_modality: bool = True,
) -> LengthGroupedSampler:
    """The sampler for ``dataset`` (needs ``lengths`` / ``modality_lengths``)."""
    if by_modality:
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths, batch_size, world_size, grad_accum, seed
        )
    return LengthGroupedSampler(dataset.lengths, batch_size, world_size, grad_accum, seed)
