"""Batch collation: pad to the longest sample, gather images (the batch format of docs/INTERFACES.md)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from llava_train.constants import IGNORE_INDEX

logger = logging.getLogger(__name__)


class DataCollator:
    """Collate dataset samples into model kwargs.

    Output: input_ids [b, s] long (pad id), labels [b, s] long (IGNORE_INDEX on padding),
    attention_mask [b, s] bool, images (None without image; [n_img, 3, S, S] for pad / square; a list
    of n_img [1 + crops, 3, S, S] for anyres), image_sizes [(w, h)] * n_img, sample_ids [str] * b.

    Args:
        tokenizer_or_pad_id: a tokenizer (its pad_token_id is used) or the pad id itself.
        padding_side: "right" (training) or "left" (batched generation).
    """

    def __init__(self, tokenizer_or_pad_id: Any, padding_side: str = "right"):
        pad = (
            tokenizer_or_pad_id if isinstance(tokenizer_or_pad_id, int) else tokenizer_or_pad_id.pad_token_id
        )
        if pad is None:
            raise ValueError(
                "the tokenizer has no pad token; call data.tokenizers.ensure_pad_token(tokenizer)"
            )
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
        self.pad_id, self.padding_side = int(pad), padding_side

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        input_ids = self._pad([s["input_ids"] for s in samples], self.pad_id)  # [b, s]
        labels = self._pad([s["labels"] for s in samples], IGNORE_INDEX)  # [b, s]
        mask = self._pad(
            [torch.ones(len(s["input_ids"]), dtype=torch.bool) for s in samples], False
        )  # [b, s]
        if not (labels != IGNORE_INDEX).any():
            logger.warning("batch %s has no supervised token", [s.get("sample_id") for s in samples])
        images, sizes = _gather_images(samples)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": mask,
            "images": images,
            "image_sizes": sizes,
            "sample_ids": [str(s.get("sample_id", "")) for s in samples],
        }

    def _pad(self, rows: list[torch.Tensor], value: Any) -> torch.Tensor:
        """[b, max_len] with ``value`` on the padding side."""
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = row
            else:
                out[i, width - len(row) :] = row
        return out


def _gather_images(samples: Sequence[dict[str, Any]]) -> tuple[Any, list[tuple[int, int]]]:
    """All images of the batch in row order: a stacked tensor, a list (anyres), or None."""
    parts = [s["images"] for s in samples if s.get("images") is not None and len(s["images"])]
    sizes = [tuple(size) for s in samples for size in (s.get("image_sizes") or [])]
    if not parts:
        return None, sizes
    if isinstance(parts[0], (list, tuple)):
        return [img for p in parts for img in p], sizes  # anyres: n_img x [1 + crops, 3, S, S]
    return torch.cat(parts, dim=0), sizes  # [n_img, 3, S, S]
