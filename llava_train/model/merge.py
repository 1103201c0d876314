"""The multimodal merge as pure functions: image features into text embeddings, and crops into one image.

Notation: b batch, s input length, T output length, n_img images in the batch, L_i feature tokens
of image i, P patches per side of one crop, h LLM hidden size.

:func:`merge_text_and_images` computes exactly what the original LLaVA computes (seed, section 3):
drop tokens outside the attention mask, replace each ``IMAGE_TOKEN_INDEX`` placeholder by that
image's features (labels IGNORE_INDEX), truncate to ``max_length``, pad left or right. It is
vectorised: every kept token gets an expanded length (1 for text, L_i for an image), a cumulative
sum gives each token's output start, and two indexed writes into a fresh buffer place the text
embeddings and the image features.

:func:`merge_image_crops` turns the [crops, P*P, h] features of each image into its [L_i, h] tokens
per ``mm_patch_merge_type``: the spatial merges are one gather with a cached index pattern per
geometry (grid permute, unpad crop, newline column). tests/reference_merge.py holds the plain
per-image loop both are checked against.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.model.anyres import (
    anyres_max_patches,
    anyres_max_shape,
    check_unpad_rounding,
    get_anyres_image_grid_shape,
    is_anyres,
    unpadded_shape,
)

logger = logging.getLogger(__name__)


def select_used_images(images_per_row: torch.Tensor, num_images: int) -> torch.Tensor | None:
    """Indices of the images the placeholders consume, or None when all of them are.

    Accepts the reference convention of one dummy image per text-only row (consumed, ignored).
    Raises ValueError naming the first row whose placeholders find no image.
    """
    num_placeholders = int(images_per_row.sum())
    if num_images == num_placeholders:
        return None
    text_only = images_per_row == 0
    if num_images == num_placeholders + int(text_only.sum()):
        consumed = images_per_row.clamp(min=1)  # [b] images each row takes, dummies included
        is_dummy = text_only.repeat_interleave(consumed)  # [n_img]
        return (~is_dummy).nonzero(as_tuple=True)[0]
    short = (images_per_row.cumsum(0) > num_images).nonzero(as_tuple=True)[0]
    if len(short):
        row = int(short[0])
        raise ValueError(
            f"row {row} has {int(images_per_row[row])} image placeholder(s) but the batch ran out of images "
            f"({num_images} images for {num_placeholders} placeholders; per-row counts "
            f"{images_per_row.tolist()}): give one image per IMAGE_TOKEN_INDEX, in row order"
        )
    raise ValueError(
        f"{num_images} images for {num_placeholders} image placeholders (per-row counts "
        f"{images_per_row.tolist()}; the last row {len(images_per_row) - 1} leaves images unused): give one "
        "image per IMAGE_TOKEN_INDEX, or one dummy image per text-only row"
    )


def merge_text_and_images(
    text_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    keep: torch.Tensor,
    labels: torch.Tensor,
    image_features: list[torch.Tensor],
    max_length: int | None,
    padding_side: str,
    seq_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Insert image features at their placeholders; truncate; pad; carry packed sample ids along.

    Args:
        text_embeds: [b, s, h] embeddings of ``input_ids`` (placeholder rows are ignored).
        input_ids: [b, s] with IMAGE_TOKEN_INDEX at each image.
        keep: [b, s] bool, the tokens to keep (the attention mask).
        labels: [b, s].
        image_features: n_img tensors [L_i, h], one per kept placeholder, in row-major order.
        max_length: truncation length of each merged row, or None.
        padding_side: "left" or "right".
        seq_ids: optional [b, s] packed sample index per token (0 = padding); image features take
            their placeholder's id.

    Returns:
        embeds [b, T, h], labels [b, T], attention mask [b, T] bool, position ids [b, T] long,
        seq_ids [b, T] long (0 on padding) or None.
    """
    b, _, h = text_embeds.shape
    device = text_embeds.device
    is_image = (input_ids == IMAGE_TOKEN_INDEX) & keep  # [b, s]
    is_text = keep & ~is_image  # [b, s]
    lengths = torch.tensor([f.shape[0] for f in image_features], dtype=torch.long, device=device)  # [n_img]

    span = is_text.long()  # [b, s] output tokens each input token expands to
    span[is_image] = lengths
    start = span.cumsum(1) - span  # [b, s] output start of each input token
    new_len = span.sum(1)  # [b]
    truncated = (
        new_len > max_length if max_length is not None else torch.zeros_like(new_len, dtype=torch.bool)
    )
    if max_length is not None:
        new_len = new_len.clamp(max=max_length)
    out_len = int(new_len.max()) if b else 0
    offset = out_len - new_len if padding_side == "left" else torch.zeros_like(new_len)  # [b]
    if truncated.any():
        logger.warning(
            "rows %s exceed tokenizer_model_max_length=%s after image expansion and were truncated",
            truncated.nonzero(as_tuple=True)[0].tolist(),
            max_length,
        )

    text_row, text_col = is_text.nonzero(as_tuple=True)  # [n_text]
    text_pos = start[text_row, text_col]  # [n_text]
    text_fit = text_pos < new_len[text_row]

    img_row = is_image.nonzero(as_tuple=True)[0].repeat_interleave(lengths)  # [sum L]
    first = (lengths.cumsum(0) - lengths).repeat_interleave(lengths)  # [sum L] index of each image's 1st row
    img_pos = start[is_image].repeat_interleave(lengths) + torch.arange(len(img_row), device=device) - first
    img_fit = img_pos < new_len[img_row]

    text_row, text_col, text_pos = text_row[text_fit], text_col[text_fit], text_pos[text_fit]
    text_dst = text_row * out_len + text_pos + offset[text_row]  # [n_text] flat output index
    features = concat_features(image_features, text_embeds)  # [sum L, h]
    if not bool(img_fit.all()):
        features, img_row, img_pos = features[img_fit], img_row[img_fit], img_pos[img_fit]
    img_dst = img_row * out_len + img_pos + offset[img_row]  # [sum L] flat output index
    arange = torch.arange(out_len, device=device)[None]  # [1, T]
    mask = (arange >= offset[:, None]) & (arange < (offset + new_len)[:, None])  # [b, T]
    embeds = text_embeds.new_zeros(b * out_len, h)  # [b*T, h]; in-place writes into a fresh buffer
    # index_copy_ (a row memcpy per index) is several times faster than advanced-index assignment on CPU
    embeds.index_copy_(0, text_dst, text_embeds[text_row, text_col])  # one scatter of text
    embeds.index_copy_(0, img_dst, features.to(embeds.dtype))  # one write of all image features
    embeds = embeds.view(b, out_len, h)  # [b, T, h]
    new_labels = labels.new_full((b * out_len,), IGNORE_INDEX)
    new_labels[text_dst] = labels[text_row, text_col]
    new_labels = new_labels.view(b, out_len)  # [b, T]

    position_ids = (arange - offset[:, None]).masked_fill(~mask, 0)  # [b, T]
    new_seq = None
    if seq_ids is not None:
        new_seq = seq_ids.new_zeros(b * out_len)
        new_seq[text_dst] = seq_ids[text_row, text_col]
        img_seq = seq_ids[is_image].repeat_interleave(lengths)  # [sum L]
        new_seq[img_dst] = img_seq if img_seq.shape[0] == img_dst.shape[0] else img_seq[img_fit]
        new_seq = new_seq.view(b, out_len)  # [b, T]
    return embeds, new_labels, mask, position_ids, new_seq


def concat_features(features: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """[sum L, h] of the per-image features; no copy when they are consecutive row blocks of one tensor.

    ``merge_image_crops`` returns splits of one buffer, so the usual case is a free view; any other
    list is concatenated.
    """
    h = like.shape[-1]
    if not features:
        return like.new_zeros(0, h)
    base = features[0]._base
    total = sum(f.shape[0] for f in features)
    if base is None or not base.is_contiguous() or base.numel() != total * h:
        return torch.cat(features)
    flat = base.view(total, h)  # [sum L, h]
    row_bytes = h * flat.element_size()
    start = flat.data_ptr()
    for f in features:
        if f._base is not base or not f.is_contiguous() or f.data_ptr() != start:
            return torch.cat(features)
        start += f.shape[0] * row_bytes
    return flat


def packed_position_ids(seq_ids: torch.Tensor) -> torch.Tensor:
    """[b, T] sample ids (contiguous runs, 0 = padding) -> positions restarting at 0 for every run."""
    _, t = seq_ids.shape
    arange = torch.arange(t, device=seq_ids.device).expand_as(seq_ids)  # [b, T]
    is_start = torch.ones_like(seq_ids, dtype=torch.bool)
    is_start[:, 1:] = seq_ids[:, 1:] != seq_ids[:, :-1]  # [b, T] first token of each run
    run_start = torch.where(is_start, arange, torch.zeros_like(arange)).cummax(dim=1).values  # [b, T]
    return arange - run_start


def drop_padding(
    real: torch.Tensor, embeds: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor
) -> tuple:
    """Rows for a varlen kernel -> one row of their real tokens: [b, T] -> [1, N], N = real.sum().

    The kernels read the samples from the position ids (packed rows) or a list of segments, so the rows
    can be laid end to end, and the padding no longer goes through every linear layer (transformers'
    flash-attention path reads packing from position ids only in a single row). Each row's first real
    token is never a target in its row (nothing real precedes it) and stays so: its label is set to
    IGNORE_INDEX before the rows are joined.
    """
    labels = labels.clone()
    labels[torch.arange(len(real), device=real.device), real.long().argmax(1)] = IGNORE_INDEX
    return embeds[real][None], position_ids[real][None], labels[real][None]


def packed_attention_mask(
    seq_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype, sliding_window: int | None = None
) -> Any:
    """The mask the decoder needs for packed rows, per attention implementation.

    sdpa: [b, 1, T, T] bool, True = attend (causal and same sample; padding attends to padding only,
    so no row is fully masked). eager: the same as an additive float mask. flex_attention: a
    :class:`~torch.nn.attention.flex_attention.BlockMask` of the same rule (:func:`packed_block_mask`):
    no [T, T] tensor reaches the kernel, and blocks of other samples are skipped. flash_attention_* and
    others: None, the packing is read from the restarting position ids (varlen kernels).
    ``sliding_window`` W: a key at most W - 1 tokens back, as transformers' sliding-window layers see.
    """
    if attn_implementation == "flex_attention":
        return packed_block_mask(seq_ids, sliding_window)
    if attn_implementation not in ("sdpa", "eager"):
        return None
    t = seq_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()  # [T, T]
    if sliding_window:
        causal = causal.triu(-(sliding_window - 1))  # kv > q - W
    allowed = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal  # [b, T, T]
    allowed = allowed[:, None]  # [b, 1, T, T]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def document_causal_mask_mod(seq_ids: torch.Tensor, sliding_window: int | None = None) -> Any:
    """FlexAttention ``mask_mod(b, h, q, kv)``: same packed sample, causal, within the window if any."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        allowed = (seq_ids[b, q] == seq_ids[b, kv]) & (q >= kv)
        if sliding_window:
            allowed = allowed & (q - kv < sliding_window)
        return allowed

    return mask_mod


def packed_block_mask(seq_ids: torch.Tensor, sliding_window: int | None = None) -> Any:
    """[b, T] sample ids -> the document-causal BlockMask ([b, 1, T, T] in 128-token blocks) for flex."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, t = seq_ids.shape
    mask_mod = document_causal_mask_mod(seq_ids, sliding_window)
    return create_block_mask(mask_mod, b, None, t, t, device=seq_ids.device)


# ----------------------------------------------------------------------------------------------
# Crops of one image -> its feature tokens
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def spatial_token_index(
    p: int, grid: tuple, unpad: bool, newline: bool, rounding: str = "round"
) -> torch.Tensor:
    """Source row of every merged token of one image, relative to its first crop's first patch; -1 = newline.

    Rows 0..P*P-1 are the base crop, then crop k (row-major over the nh x nw grid) at (k+1)*P*P.
    ``grid`` is (0, 0) for a single-crop image, else (num_h, num_w, (w, h)). ``unpad`` crops the
    letterbox off the grid's feature map (``rounding``: the config's ``mm_unpad_rounding``, part of the cache
    key); ``newline`` ends every map row (and a lone base crop) with -1.
    """
    base = torch.arange(p * p)  # [P*P]
    if not grid[0]:
        return torch.cat([base, torch.tensor([-1])]) if newline else base
    num_h, num_w, size = grid
    rows = torch.arange(num_h * p)[:, None]  # [nh*P, 1] feature-map row
    cols = torch.arange(num_w * p)[None, :]  # [1, nw*P] feature-map column
    src = p * p + ((rows // p) * num_w + cols // p) * p * p + (rows % p) * p + cols % p  # [nh*P, nw*P]
    if unpad:
        new_h, new_w = unpadded_shape(num_h * p, num_w * p, size, rounding)
        top, left = (num_h * p - new_h) // 2, (num_w * p - new_w) // 2
        src = src[top : top + new_h, left : left + new_w]  # [H', W']
    if newline:
        src = torch.cat([src, torch.full((src.shape[0], 1), -1)], dim=1)  # [H', W'+1] newline column
    return torch.cat([base, src.flatten()])  # [L]


def merge_image_crops(
    features: torch.Tensor,
    crops: list[int],
    image_sizes: list | None,
    *,
    merge_type: str,
    image_aspect_ratio: str,
    grid_pinpoints: Any,
    crop_size: int,
    newline: torch.Tensor | None,
    unpad_rounding: str = "round",
) -> list[torch.Tensor]:
    """[sum crops, P*P, h] of all images -> per-image [L_i, h] per ``merge_type``.

    flat: the crops' tokens in order (free views of one buffer). spatial / spatial_unpad: the base crop,
    then the grid's feature map row by row (unpadded and, for ``anyres_max_N``, bilinearly downscaled to
    about N crops; with unpad a ``newline`` token closes every row; ``unpad_rounding`` as the config's
    ``mm_unpad_rounding``). All images come out of one gather with a cached index pattern per geometry:
    the features are copied once.
    """
    n, pp, h = features.shape  # [sum crops, P*P, h]
    if merge_type == "flat":
        return list(torch.split(features.flatten(0, 1), [c * pp for c in crops]))  # views, no copy
    if not merge_type.startswith("spatial"):
        raise ValueError(f"unknown mm_patch_merge_type {merge_type!r}; use flat, spatial or spatial_unpad")
    unpad = "unpad" in merge_type
    if unpad:
        check_unpad_rounding(unpad_rounding)
    if unpad and newline is None:
        raise ValueError("mm_patch_merge_type has 'unpad' but the model has no image_newline parameter")
    if any(c > 1 for c in crops):
        if not is_anyres(image_aspect_ratio):
            raise ValueError(
                f"several crops per image need image_aspect_ratio anyres, got {image_aspect_ratio!r}"
            )
        if image_sizes is None:
            raise ValueError("anyres images need image_sizes (one (w, h) per image)")
    p = math.isqrt(pp)
    max_patches = anyres_max_patches(image_aspect_ratio) if unpad else None
    flat = features.reshape(n * pp, h)  # [sum crops * P*P, h]
    index, lengths, resized, first = [], [], {}, 0
    for i, c in enumerate(crops):
        grid = (0, 0)
        if c > 1:
            size = tuple(image_sizes[i])
            num_w, num_h = get_anyres_image_grid_shape(size, grid_pinpoints, crop_size)
            if num_w * num_h != c - 1:
                raise ValueError(f"image {i}: {c - 1} crops but its size {size} needs a {num_w}x{num_h} grid")
            grid = (num_h, num_w, size)
            if max_patches is not None:
                shape = unpadded_shape(num_h * p, num_w * p, size, unpad_rounding)
                target = anyres_max_shape(*shape, max_patches, p)
                if target != shape:
                    resized[i] = (shape, target)
        pattern = spatial_token_index(p, grid, unpad, unpad and i not in resized, unpad_rounding)  # [L_i]
        index.append(torch.where(pattern < 0, -1, pattern + first * pp))
        lengths.append(len(pattern))
        first += c
    index = torch.cat(index).to(flat.device)  # [sum L], -1 = newline
    merged = flat.index_select(0, index.clamp(min=0))  # [sum L, h]: the only copy of the features
    if unpad:
        rows = (index < 0).nonzero(as_tuple=True)[0]  # [n_newline]
        newline = newline.to(device=flat.device, dtype=flat.dtype)  # [h]
        merged.index_copy_(0, rows, newline[None].expand(len(rows), h))  # in place: no copy
    out = list(torch.split(merged, lengths))
    for i, (shape, target) in resized.items():
        fmap = out[i][pp:].view(*shape, h).permute(2, 0, 1)  # [h, H', W']
        fmap = F.interpolate(fmap[None], size=list(target), mode="bilinear")[0]  # [h, H'', W'']
        column = newline[:, None, None].expand(-1, target[0], 1)  # [h, H'', 1]
        fmap = torch.cat([fmap, column], dim=-1).flatten(1, 2).transpose(0, 1)  # [H''*(W''+1), h]
        out[i] = torch.cat([out[i][:pp], fmap])  # [P*P + H''*(W''+1), h]
    return out
