"""``model.attn_implementation=sdpa_varlen``: packed rows with no [T, T] mask, on any device.

Under ``sdpa`` a packed row (data/packing.py) gets a [b, 1, T, T] block-diagonal causal mask, and torch's
kernels compute every query-key score of the row, then mask most of them away. ``sdpa_varlen`` runs one
causal ``scaled_dot_product_attention`` per packed sample instead, as flash-attention's varlen kernel does
on a GPU: the work is the sum of each sample's L x L / 2 scores, not T x T, and with no mask torch's CPU
kernel skips the blocks above the diagonal. Samples are read from the restarting position ids
(:func:`packed_segments`). Packed rows reach it laid end to end as one row of their real tokens
(``drop_padding`` in merge.py, as for flash-attention), so the padding skips every linear layer too.

Padded rows in training (labels, no cache, each row's real tokens one run) go padding-free the same
way: their real tokens end to end, one segment a row (:func:`row_segments`, in llava_lm.py), at the
positions sdpa would give them. Eval and generation on padded rows run as ``sdpa`` does (transformers'
own mask and kernel). Sliding-window layers (Mistral, Gemma 3's local layers) get a banded mask on
samples longer than the window. Equal to the unpacked step, loss and every gradient, in
tests/test_packing.py; timed in benchmarks/bench_train_step.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

NAME = "sdpa_varlen"
SEGMENTS_KWARG = "packed_segments"
_SEGMENTS_GIVEN = contextvars.ContextVar("sdpa_varlen_segments_given", default=False)


def packed_segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """[b, T] position ids that restart at 0 for every packed sample -> each row's (start, end) runs."""
    t = position_ids.shape[1]
    out = []
    for row in position_ids:
        starts = (row == 0).nonzero().flatten().tolist() or [0]
        out.append(list(zip(starts, starts[1:] + [t])))
    return out


def row_segments(lengths: list[int]) -> list[list[tuple[int, int]]]:
    """Rows of these lengths laid end to end in one row -> its (start, end) runs (empty rows skipped)."""
    return [[(end - n, end) for n, end in zip(lengths, itertools.accumulate(lengths)) if n]]


def _window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal and at most ``window`` - 1 keys back; None where plain causal is the same."""
    if not window or length <= window:
        return None
    return torch.ones(length, length, dtype=torch.bool, device=device).tril().triu(-(window - 1))


def sdpa_varlen_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: [b, h, T, d] query, [b, h_kv, T, d] key / value -> [b, T, h, d]."""
    segments = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"attn_implementation={NAME} has no attention-logit softcapping; use eager")
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: query heads per key / value head
    window = kwargs.get("sliding_window")
    rows = []
    # unbind and split, not slices: their backward is one stack / cat, a slice's a zero-filled full tensor
    for q_row, k_row, v_row, runs in zip(query.unbind(0), key.unbind(0), value.unbind(0), segments):
        sizes = [end - start for start, end in runs]
        out = []
        for q, k, v in zip(*(t.split(sizes, dim=1) for t in (q_row, k_row, v_row))):  # [h, L, d]
            mask = _window_mask(q.shape[1], window, query.device)
            if mask is not None and groups > 1:  # torch's masked kernels may not take GQA: repeat
                k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
            out.append(
                F.scaled_dot_product_attention(
                    q[None],
                    k[None],
                    v[None],
                    attn_mask=mask,
                    dropout_p=dropout if module.training else 0.0,
                    is_causal=mask is None,
                    scale=scaling,
                    enable_gqa=mask is None and groups > 1,  # no repeated key / value copies
                )[0]
            )
        rows.append(torch.cat(out, dim=1))  # [h, T, d]
    return torch.stack(rows).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def segments_given() -> Iterator[None]:
    """Around a decoder call that passes ``packed_segments``: transformers builds no mask for it.

    With no 2D mask and restarting position ids, transformers would build a [1, 1, N, N] packed mask
    for every forward (N^2 booleans: 256 MB at 16k tokens) that this kernel never reads.
    """
    token = _SEGMENTS_GIVEN.set(True)
    try:
        yield
    finally:
        _SEGMENTS_GIVEN.reset(token)


def _mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """transformers' mask interface for ``sdpa_varlen``: None under :func:`segments_given`, else sdpa's."""
    from transformers.masking_utils import sdpa_mask

    return None if _SEGMENTS_GIVEN.get() else sdpa_mask(*args, **kwargs)


def register() -> None:
    """Make ``sdpa_varlen`` an attention implementation transformers accepts; padded rows outside
    :func:`segments_given` (eval, generation, masks with holes) get sdpa's masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, sdpa_varlen_forward)
    AttentionMaskInterface.register(NAME, _mask)
