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


class TokenBudgetBatchSampler(Sampler[list[int]]):
    """Micro-batches of dataset rows under a token budget: rows x longest row <= ``max_tokens``.

    A row is one sample (or one pack of a PackedDataset); ``lengths`` are exact (image feature tokens
    included), so the budget bounds the padded [b, T] the model sees. Each epoch (seeded by ``seed +
    epoch``, identical on every rank) shuffles the rows, sorts them by length (a stable sort: equal
    lengths stay in shuffled order), cuts the sorted run greedily into micro-batches, and shuffles the
    micro-batches. Every row is in exactly one micro-batch per epoch, and the number of micro-batches is
    the same every epoch (it depends on the sorted lengths only). That number is made a multiple of
    ``world_size * grad_accum`` (accelerate deals whole micro-batches to ranks; an optimizer step takes
    that many) by splitting the micro-batches with the most rows in two, never by repeating rows.

    Args:
        lengths: exact length per row; a negative sign (modality_lengths) marks text-only rows.
        max_tokens: the budget (data.max_tokens_per_batch).
        world_size, grad_accum: ranks and accumulation steps.
        seed: base seed; the epoch is added (set_epoch).
        by_modality: micro-batches are single-modality (all with image, or all text-only).
        names: per-row names for error messages (default: the index).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        world_size: int = 1,
        grad_accum: int = 1,
        seed: int = 0,
        by_modality: bool = False,
        names: Sequence[str] | None = None,
    ):
        self.lengths = [abs(int(n)) for n in lengths]
        too_long = [i for i, n in enumerate(self.lengths) if n > max_tokens]
        if too_long:
            i = too_long[0]
            name = names[i] if names is not None else f"index {i}"
            raise ValueError(
                f"{len(too_long)} row(s) are longer than data.max_tokens_per_batch={max_tokens} (first: {name}, "
                f"{self.lengths[i]} tokens) and fit no micro-batch: raise the budget to at least the model's "
                "maximum length (model.model_max_length), the longest a sample can be"
            )
        signs = [int(n) > 0 for n in lengths] if by_modality else [True] * len(self.lengths)
        self.groups = [[i for i, s in enumerate(signs) if s == key] for key in (True, False)]
        self.max_tokens, self.multiple = max_tokens, world_size * grad_accum
        self.seed, self.epoch = seed, 0
        self._count = len(self._batches())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            order.sort(key=lambda i: -self.lengths[i])
            batches += self._cut(order)
        batches = self._split_to_multiple(batches)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def _cut(self, order: list[int]) -> list[list[int]]:
        """Greedy over rows sorted longest first: the first row of a micro-batch sets its width."""
        batches: list[list[int]] = []
        for i in order:
            if batches and (len(batches[-1]) + 1) * self.lengths[batches[-1][0]] <= self.max_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def _split_to_multiple(self, batches: list[list[int]]) -> list[list[int]]:
        while len(batches) % self.multiple:
            k = max(range(len(batches)), key=lambda j: len(batches[j]))
            if len(batches[k]) < 2:
                raise ValueError(
                    f"{sum(map(len, batches))} rows cannot make a multiple of world_size x gradient accumulation "
                    f"(= {self.multiple}) micro-batches: use more data, fewer ranks, or a smaller "
                    "training.global_batch_tokens"
                )
            half = (len(batches[k]) + 1) // 2
            batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return self._count


def build_token_budget_sampler(
    dataset,
    max_tokens: int,
    world_size: int = 1,
    grad_accum: int = 1,
    seed: int = 0,
    by_modality: bool = False,
    num_workers: int = 0,
) -> TokenBudgetBatchSampler:
    """The token-budget batch sampler for a sample dataset (exact lengths computed, cached) or a PackedDataset."""
    from llava_train.data.packing import PackedDataset, exact_lengths

    if isinstance(dataset, PackedDataset):
        lengths = dataset.lengths
    else:
        lengths = exact_lengths(dataset, num_workers)
    if by_modality:  # the sign of modality_lengths marks text-only rows
        lengths = [n if m > 0 else -n for n, m in zip(lengths, dataset.modality_lengths)]
    names = [str(p) for p in dataset.packs] if isinstance(dataset, PackedDataset) else None
    return TokenBudgetBatchSampler(lengths, max_tokens, world_size, grad_accum, seed, by_modality, names)
