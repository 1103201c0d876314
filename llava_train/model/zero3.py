"""ZeRO-3 parameter helpers: what the model and the training code need to touch sharded weights.

Under DeepSpeed ZeRO-3 a parameter is a shard (``numel() == 0`` outside a gather); these helpers tell a
shard apart, count its whole size, and make it whole for a read or a write. Ordinary parameters pass
through unchanged, so callers need no ZeRO-3 branch of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch


def is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3-partitioned parameter (zero.Init or DeepSpeed marked it; empty outside a gather)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Element count of the whole parameter, also for a ZeRO-3 shard (whose numel() is 0)."""
    return getattr(param, "ds_numel", None) or param.numel()


def gathered(params: Sequence[torch.Tensor], modifier_rank: int | None = 0) -> Any:
    """Context in which ZeRO-3-partitioned ``params`` are whole; with ``modifier_rank`` that rank's writes
    reach every rank's shard (None: read only). A no-op for ordinary parameters."""
    if any(is_sharded(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)
    return contextlib.nullcontext()
