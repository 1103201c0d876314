"""LLaVA glue: vision modules on the LLM, and the multimodal merge of image features into text.

Notation: b batch, s input length, T output length, n_img images in the batch, L_i feature tokens
of image i, P patches per side of one crop, h LLM hidden size, d_v vision hidden size.

The merge (:meth:`LlavaMetaForCausalLM.prepare_inputs_labels_for_multimodal`) computes exactly what
the original LLaVA computes (seed, section 3): drop tokens outside the attention mask, replace each
``IMAGE_TOKEN_INDEX`` placeholder by that image's features (labels IGNORE_INDEX), truncate to
``tokenizer_model_max_length``, pad left or right. It is vectorised: every kept token gets an
expanded length (1 for text, L_i for an image), a cumulative sum gives each token's output start,
and two indexed writes into a fresh buffer place the text embeddings and the image features. What remains a Python loop
is the per-image feature reshaping for anyres (grid shape, unpad, newline), one step per image.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from llava_train.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava_train.model.anyres import (
    anyres_max_downscale,
    anyres_max_patches,
    get_anyres_image_grid_shape,
    is_anyres,
    unpad_image,
    unpadded_shape,
)
from llava_train.model.projector import build_vision_projector
from llava_train.model.vision_tower import CLIPVisionTower, build_vision_tower

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Vectorised merge (pure functions, tested against a loop reference in tests/reference_merge.py)
# ----------------------------------------------------------------------------------------------


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Insert image features at their placeholders; truncate; pad (see :func:`merge_packed`)."""
    merged = merge_packed(text_embeds, input_ids, keep, labels, image_features, max_length, padding_side)
    return merged[:4]


def merge_packed(
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

    ``image_features`` returns splits / unbinds of one buffer, so the usual case is a free view; any
    other list is concatenated.
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


def packed_attention_mask(seq_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> Any:
    """The mask LlamaModel needs for packed rows, per attention implementation.

    sdpa: [b, 1, T, T] bool, True = attend (causal and same sample; padding attends to padding only,
    so no row is fully masked). eager: the same as an additive float mask. flash_attention_* and
    others: None, the packing is read from the restarting position ids (varlen kernels).
    """
    if attn_implementation not in ("sdpa", "eager"):
        return None
    t = seq_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seq_ids.device).tril()  # [T, T]
    allowed = (seq_ids[:, :, None] == seq_ids[:, None, :]) & causal  # [b, T, T]
    allowed = allowed[:, None]  # [b, 1, T, T]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seq_ids.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


# ----------------------------------------------------------------------------------------------
# Vision modules on the base model
# ----------------------------------------------------------------------------------------------


def load_projector_weights(path: str) -> dict[str, torch.Tensor]:
    """State dict of a saved projector: ``.safetensors``, or a legacy ``.bin`` (weights only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrain_mm_mlp_adapter {path!r} is not a file (mm_projector.bin/.safetensors)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def state_mismatch(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[list, list, list]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against the ``expected`` state dict."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, wrong


def projector_state_from(weights: dict[str, torch.Tensor], projector: nn.Module, path: str) -> dict:
    """Keys after ``mm_projector.`` (any prefix, e.g. ``model.mm_projector.``), checked against ``projector``."""
    state = {k.split("mm_projector.", 1)[1]: v for k, v in weights.items() if "mm_projector." in k}
    missing, unexpected, wrong = state_mismatch(projector.state_dict(), state)
    if missing or unexpected or wrong:
        raise ValueError(
            f"projector weights in {path} do not fit this projector ({projector.__class__.__name__}): "
            f"missing {missing}, unexpected {unexpected}, shape mismatch {wrong}; file keys {sorted(weights)[:8]}. "
            "Check mm_projector_type / mm_hidden_size / hidden_size against the run that saved it."
        )
    return state


def load_projector(projector: nn.Module, path: str) -> None:
    """Load the ``mm_projector`` weights of ``path`` into ``projector`` (gathered whole under ZeRO-3)."""
    with gathered(list(projector.parameters())):
        projector.load_state_dict(projector_state_from(load_projector_weights(path), projector, path))


class LlavaMetaModel:
    """Mixin for the base LLM: owns ``vision_tower``, ``mm_projector`` and ``image_newline``."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if getattr(config, "mm_vision_tower", None):
            self.vision_tower = build_vision_tower(config, delay_load=True)
            self.mm_projector = build_vision_projector(config)
            if "unpad" in (getattr(config, "mm_patch_merge_type", None) or ""):
                self.image_newline = nn.Parameter(self._newline_init(config.hidden_size))

    @staticmethod
    def _newline_init(hidden_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return torch.randn(hidden_size, dtype=dtype) / math.sqrt(hidden_size)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        tower = getattr(self, "vision_tower", None)
        return tower[0] if isinstance(tower, list) else tower

    def initialize_vision_modules(self, model_args: Any, fsdp: list | None = None) -> None:
        """Build (or load) the tower, build the projector and newline, record the mm_* config keys.

        ``model_args`` needs ``vision_tower``; optional: ``mm_vision_select_layer``,
        ``mm_vision_select_feature``, ``mm_projector_type``, ``mm_patch_merge_type``,
        ``pretrain_mm_mlp_adapter``, ``mm_vision_config``, ``use_s2``, ``s2_scales``.
        New modules take the dtype and device of the LLM's embeddings.
        """
        config = self.config
        config.mm_vision_tower = model_args.vision_tower
        config.mm_vision_select_layer = getattr(model_args, "mm_vision_select_layer", -2)
        config.mm_vision_select_feature = getattr(model_args, "mm_vision_select_feature", "patch")
        config.mm_patch_merge_type = getattr(model_args, "mm_patch_merge_type", "flat") or "flat"
        if config.mm_vision_select_feature == "cls_patch" and config.mm_patch_merge_type != "flat":
            raise ValueError(  # the spatial grid has no place for the CLS feature (the original fails too)
                f"mm_vision_select_feature=cls_patch with mm_patch_merge_type={config.mm_patch_merge_type}: "
                "use mm_patch_merge_type=flat, or mm_vision_select_feature=patch"
            )
        config.mm_vision_config = getattr(model_args, "mm_vision_config", None) or config.mm_vision_config
        for key in ("use_s2", "s2_scales"):
            if hasattr(model_args, key):
                setattr(config, key, getattr(model_args, key))
        weight = self.embed_tokens.weight
        tower = self.get_vision_tower()
        if tower is None:
            tower = build_vision_tower(config)
            if not any(is_sharded(p) for p in tower.parameters()):  # zero.Init placed a pretrained one
                tower = tower.to(device=weight.device, dtype=weight.dtype)
            self.vision_tower = [tower] if fsdp else tower
        else:
            tower.load_model()

        config.use_mm_proj = True
        config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear") or "linear"
        config.mm_hidden_size = tower.hidden_size
        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(config).to(device=weight.device, dtype=weight.dtype)
            if "unpad" in config.mm_patch_merge_type:
                newline = self._newline_init(config.hidden_size, weight.dtype).to(weight.device)
                self.image_newline = nn.Parameter(newline)
        else:
            self.mm_projector.requires_grad_(True)

        path = getattr(model_args, "pretrain_mm_mlp_adapter", None)
        if path:
            load_projector(self.mm_projector, path)


def is_sharded(param: torch.Tensor) -> bool:
    """A ZeRO-3-partitioned parameter (zero.Init or DeepSpeed marked it; empty outside a gather)."""
    return hasattr(param, "ds_id")


def full_numel(param: torch.Tensor) -> int:
    """Element count of the whole parameter, also for a ZeRO-3 shard (whose numel() is 0)."""
    return getattr(param, "ds_numel", None) or param.numel()


def gathered(params: Sequence[torch.Tensor]) -> Any:
    """Context in which ZeRO-3-partitioned ``params`` are whole, and rank 0's writes reach every rank's
    shard; a no-op for ordinary parameters."""
    if any(is_sharded(p) for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# The causal LM side: encode, reshape per merge type, merge
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def spatial_token_index(p: int, grid: tuple, unpad: bool) -> torch.Tensor:
    """Source row of every merged token of one image, relative to its first crop's first patch; -1 = newline.

    Rows 0..P*P-1 are the base crop, then crop k (row-major over the nh x nw grid) at (k+1)*P*P.
    ``grid`` is (0, 0) for a single-crop image, else (num_h, num_w, (w, h)). Mirrors _merge_crops.
    """
    base = torch.arange(p * p)  # [P*P]
    if not grid[0]:
        return torch.cat([base, torch.tensor([-1])]) if unpad else base
    num_h, num_w, size = grid
    rows = torch.arange(num_h * p)[:, None]  # [nh*P, 1] feature-map row
    cols = torch.arange(num_w * p)[None, :]  # [1, nw*P] feature-map column
    src = p * p + ((rows // p) * num_w + cols // p) * p * p + (rows % p) * p + cols % p  # [nh*P, nw*P]
    if unpad:
        new_h, new_w = unpadded_shape(num_h * p, num_w * p, size)
        top, left = (num_h * p - new_h) // 2, (num_w * p - new_w) // 2
        src = src[top : top + new_h, left : left + new_w]  # [H', W']
        src = torch.cat([src, torch.full((new_h, 1), -1)], dim=1)  # [H', W'+1] newline column
    return torch.cat([base, src.flatten()])  # [L]


class LlavaMetaForCausalLM:
    """Mixin for the causal LM: image encoding and the multimodal merge. Needs ``get_model()``."""

    def get_model(self) -> LlavaMetaModel:  # pragma: no cover - provided by the concrete class
        raise NotImplementedError

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return self.get_model().get_vision_tower()

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, P*P, h]."""
        features = self.get_model().get_vision_tower()(images)  # [n, P*P, d_v], in the pixels' dtype
        projector = self.get_model().mm_projector
        return projector(features.to(next(projector.parameters()).dtype))  # fp32 pixels, bf16 model: no mixup

    def image_features(
        self, images: torch.Tensor | list[torch.Tensor], image_sizes: list | None
    ) -> list[torch.Tensor]:
        """Per-image merged features [L_i, h]: stacked images are flat; lists / 5-D go by merge type."""
        # (w, h) pairs as plain ints: a tensor [n, 2] works too, and the index cache keys by value.
        if image_sizes is not None:
            image_sizes = [tuple(int(v) for v in size) for size in image_sizes]
        if not isinstance(images, list) and images.ndim == 4:
            return list(self.encode_images(images))  # n_img x [P*P, h]
        images = [x[None] if x.ndim == 3 else x for x in images]  # each [crops, 3, S, S]
        if not images:
            return []
        features = self.encode_images(torch.cat(images))  # [sum crops, P*P, h]
        crops = [x.shape[0] for x in images]
        merge_type = getattr(self.config, "mm_patch_merge_type", "flat") or "flat"
        if merge_type == "flat":
            lengths = [c * features.shape[1] for c in crops]
            return list(torch.split(features.flatten(0, 1), lengths))  # views of one buffer, no copy
        if merge_type.startswith("spatial") and anyres_max_patches(self.config.image_aspect_ratio) is None:
            return self._gather_spatial(features, crops, image_sizes, unpad="unpad" in merge_type)
        per_image = torch.split(features, crops)
        return [self._merge_crops(f, image_sizes, i) for i, f in enumerate(per_image)]

    def _gather_spatial(
        self, features: torch.Tensor, crops: list[int], image_sizes: list | None, unpad: bool
    ) -> list[torch.Tensor]:
        """spatial / spatial_unpad for all images at once: one gather with cached per-geometry indices.

        Same result as :meth:`_merge_crops` image by image (grid permute, unpad crop, newline column),
        but the reshaping is an index pattern (cached per grid shape and image size), so the features
        are copied once instead of 3-4 times per image.
        """
        n, pp, h = features.shape  # [sum crops, P*P, h]
        p = math.isqrt(pp)
        if any(c > 1 for c in crops):
            self._check_anyres(image_sizes)
        flat = features.reshape(n * pp, h)  # [sum crops * P*P, h]
        index, lengths, first = [], [], 0
        for i, c in enumerate(crops):
            grid = (0, 0)
            if c > 1:
                tower = self.get_vision_tower()
                size = tuple(image_sizes[i])
                num_w, num_h = get_anyres_image_grid_shape(
                    size, self.config.image_grid_pinpoints, tower.config.image_size
                )
                if num_w * num_h != c - 1:
                    raise ValueError(
                        f"image {i}: {c - 1} crops but its size {size} needs a {num_w}x{num_h} grid"
                    )
                grid = (num_h, num_w, size)
            pattern = spatial_token_index(p, grid, unpad)  # [L_i], -1 = newline
            index.append(torch.where(pattern < 0, -1, pattern + first * pp))
            lengths.append(len(pattern))
            first += c
        index = torch.cat(index).to(flat.device)  # [sum L], -1 = newline
        merged = flat.index_select(0, index.clamp(min=0))  # [sum L, h]: the only copy of the features
        if unpad:
            rows = (index < 0).nonzero(as_tuple=True)[0]  # [n_newline]
            merged.index_copy_(0, rows, self._newline(flat)[None].expand(len(rows), h))  # in place: no copy
        return list(torch.split(merged, lengths))

    def _check_anyres(self, image_sizes: list | None) -> None:
        aspect = getattr(self.config, "image_aspect_ratio", "square")
        if not is_anyres(aspect):
            raise ValueError(f"several crops per image need image_aspect_ratio anyres, got {aspect!r}")
        if image_sizes is None:
            raise ValueError("anyres images need image_sizes (one (w, h) per image)")

    def _merge_crops(self, feature: torch.Tensor, image_sizes: list | None, index: int) -> torch.Tensor:
        """[crops, P*P, h] of one image -> [L, h] per ``mm_patch_merge_type``."""
        merge_type = getattr(self.config, "mm_patch_merge_type", "flat") or "flat"
        if merge_type == "flat":
            return feature.flatten(0, 1)
        if not merge_type.startswith("spatial"):
            raise ValueError(
                f"unknown mm_patch_merge_type {merge_type!r}; use flat, spatial or spatial_unpad"
            )
        unpad = "unpad" in merge_type
        if feature.shape[0] == 1:
            return torch.cat([feature[0], self._newline(feature)[None]]) if unpad else feature[0]
        aspect = getattr(self.config, "image_aspect_ratio", "square")
        if not is_anyres(aspect):
            raise ValueError(
                f"{feature.shape[0]} crops per image need image_aspect_ratio anyres, got {aspect!r}"
            )
        if image_sizes is None:
            raise ValueError("anyres images need image_sizes (one (w, h) per image)")
        tower = self.get_vision_tower()
        p = tower.num_patches_per_side
        base, crops = feature[0], feature[1:]  # [P*P, h], [crops, P*P, h]
        size = tuple(image_sizes[index])
        num_w, num_h = get_anyres_image_grid_shape(
            size, self.config.image_grid_pinpoints, tower.config.image_size
        )
        grid = crops.view(num_h, num_w, p, p, -1)  # [nh, nw, P, P, h]
        if not unpad:
            return torch.cat([base, grid.permute(0, 2, 1, 3, 4).flatten(0, 3)])  # [P*P + nh*nw*P*P, h]
        fmap = grid.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [h, nh*P, nw*P]
        fmap = unpad_image(fmap, size)  # [h, H', W']
        max_patches = anyres_max_patches(aspect)
        if max_patches is not None:
            fmap = anyres_max_downscale(fmap, max_patches, p)
        newline = self._newline(fmap)[:, None, None].expand(-1, fmap.shape[1], 1)  # [h, H', 1]
        fmap = torch.cat([fmap, newline], dim=-1)  # [h, H', W'+1]
        return torch.cat([base, fmap.flatten(1, 2).transpose(0, 1)])  # [P*P + H'*(W'+1), h]

    def _newline(self, like: torch.Tensor) -> torch.Tensor:
        newline = getattr(self.get_model(), "image_newline", None)
        if newline is None:
            raise ValueError("mm_patch_merge_type has 'unpad' but the model has no image_newline parameter")
        return newline.to(device=like.device, dtype=like.dtype)

    def _unused_mm_anchor(self) -> torch.Tensor:
        """0 * (tower + projector + newline) of one blank crop, for an image-free batch under autograd.

        Every multimodal module still runs: DDP needs each trainable parameter (a tuned tower's too) in
        the graph, and ZeRO-3 needs every rank to gather the same parameters, images or not (the original
        feeds a blank image to text-only samples for the same reason).
        """
        model = self.get_model()
        tower = model.get_vision_tower()
        side = tower.image_size
        blank = torch.zeros(1, 3, side, side, device=tower.device, dtype=tower.dtype)  # [1, 3, S, S]
        anchor = self.encode_images(blank).sum()
        newline = getattr(model, "image_newline", None)
        if newline is not None:
            anchor = anchor + newline.sum()
        return anchor * 0.0

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: torch.Tensor | list[torch.Tensor] | None,
        image_sizes: list | None = None,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple:
        """Returns (None, position_ids, attention_mask, past_key_values, inputs_embeds, labels).

        Pass-through (input_ids returned, embeds None) for a decode step (s == 1) or with no tower, and
        for image-free batches outside autograd. position_ids / attention_mask / labels come back None
        when they came in None (original convention); the mask keeps its dtype.

        Packed rows (``seq_ids`` [b, s], data/packing.py): position ids restart at every sample and the
        attention mask is :func:`packed_attention_mask` (4D block-diagonal causal for sdpa / eager).
        """
        if seq_ids is not None:
            return self._prepare_packed(input_ids, past_key_values, labels, images, image_sizes, seq_ids)
        tower = self.get_vision_tower()
        if tower is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        if images is None:
            if not torch.is_grad_enabled():
                return input_ids, position_ids, attention_mask, past_key_values, None, labels
            embeds = self.get_model().embed_tokens(input_ids) + self._unused_mm_anchor()  # [b, s, h]
            return None, position_ids, attention_mask, past_key_values, embeds, labels

        keep = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        full_labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        padding_side = getattr(self.config, "tokenizer_padding_side", "right") or "right"
        embeds, new_labels, mask, new_pos, _ = self._embed_and_merge(
            input_ids, keep, full_labels, images, image_sizes, padding_side
        )
        new_mask = None if attention_mask is None else mask.to(attention_mask.dtype)
        new_pos = None if position_ids is None else new_pos.to(position_ids.dtype)
        new_labels = None if labels is None else new_labels
        return None, new_pos, new_mask, past_key_values, embeds, new_labels

    def _embed_and_merge(
        self,
        input_ids: torch.Tensor,
        keep: torch.Tensor,
        labels: torch.Tensor,
        images: torch.Tensor | list[torch.Tensor] | None,
        image_sizes: list | None,
        padding_side: str,
        seq_ids: torch.Tensor | None = None,
    ) -> tuple:
        """Encode images, embed text, merge (:func:`merge_packed`); keeps the mm modules in the graph."""
        features = self.image_features(images, image_sizes) if images is not None else []
        is_image = (input_ids == IMAGE_TOKEN_INDEX) & keep  # [b, s]
        used = select_used_images(is_image.sum(1), len(features))
        if used is not None:
            features = [features[i] for i in used.tolist()]
        text_ids = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, 0)  # [b, s]
        text_embeds = self.get_model().embed_tokens(text_ids)  # [b, s, h]
        if not features and torch.is_grad_enabled() and self.get_vision_tower() is not None:
            text_embeds = text_embeds + self._unused_mm_anchor()
        max_length = getattr(self.config, "tokenizer_model_max_length", None)
        return merge_packed(text_embeds, input_ids, keep, labels, features, max_length, padding_side, seq_ids)

    def _prepare_packed(
        self,
        input_ids: torch.Tensor,
        past_key_values: Any,
        labels: torch.Tensor | None,
        images: torch.Tensor | list[torch.Tensor] | None,
        image_sizes: list | None,
        seq_ids: torch.Tensor,
    ) -> tuple:
        """Packed rows: merge, then per-sample position ids and the block-diagonal causal mask."""
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("packed rows (seq_ids) are for training / scoring; generate without seq_ids")
        if seq_ids.shape != input_ids.shape:
            raise ValueError(f"seq_ids {tuple(seq_ids.shape)} must match input_ids {tuple(input_ids.shape)}")
        full_labels = torch.full_like(input_ids, IGNORE_INDEX) if labels is None else labels
        embeds, new_labels, _, _, new_seq = self._embed_and_merge(
            input_ids, seq_ids > 0, full_labels, images, image_sizes, "right", seq_ids
        )
        position_ids = packed_position_ids(new_seq)  # [b, T]
        attn = getattr(self.config, "_attn_implementation", None) or "sdpa"
        mask = packed_attention_mask(new_seq, attn, embeds.dtype)  # [b, 1, T, T] or None
        return None, position_ids, mask, past_key_values, embeds, None if labels is None else new_labels

    def initialize_vision_tokenizer(self, model_args: Any, tokenizer: Any) -> None:
        """Add <im_patch> / <im_start>,<im_end> as the original; new embedding rows = mean of the old."""
        tune_adapter = getattr(model_args, "tune_mm_mlp_adapter", False)
        if getattr(model_args, "mm_use_im_patch_token", False):
            tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))
        if getattr(model_args, "mm_use_im_start_end", False):
            num_new = tokenizer.add_tokens(
                [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True
            )
            self.resize_token_embeddings(len(tokenizer))
            if num_new > 0:
                self._mean_init_new_rows(num_new)
            if tune_adapter:
                self.get_input_embeddings().requires_grad_(True)
                if self.get_output_embeddings().weight is not self.get_input_embeddings().weight:  # untied
                    self.get_output_embeddings().requires_grad_(False)
            path = getattr(model_args, "pretrain_mm_mlp_adapter", None)
            if path:
                self._load_pretrained_token_rows(path, tokenizer)
        elif getattr(model_args, "mm_use_im_patch_token", False) and tune_adapter:
            self.get_input_embeddings().requires_grad_(False)
            self.get_output_embeddings().requires_grad_(False)

    @torch.no_grad()
    def _mean_init_new_rows(self, num_new: int) -> None:
        pair = (self.get_input_embeddings().weight, self.get_output_embeddings().weight)
        weights = list({id(w): w for w in pair}.values())  # once if tied
        with gathered(weights):
            for weight in weights:
                weight[-num_new:] = weight[:-num_new].mean(dim=0, keepdim=True)

    @torch.no_grad()
    def _load_pretrained_token_rows(self, path: str, tokenizer: Any) -> None:
        """The stage-1 rows of <im_start> / <im_end> (a whole saved matrix, or just those 2 rows).

        Rows are found by token id, so a tokenizer that already had the tokens (saved by stage 1) loads
        them too, and no other row is touched.
        """
        saved = load_projector_weights(path).get("model.embed_tokens.weight")
        if saved is None:
            return
        weight = self.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN])
        with gathered([weight]):
            saved = saved.to(device=weight.device, dtype=weight.dtype)  # an indexed write needs one device
            rows = torch.tensor(ids, device=weight.device)
            if saved.shape == weight.shape:
                weight[rows] = saved[rows]
            elif saved.shape == (len(ids), weight.shape[1]):
                weight[rows] = saved
            else:
                raise ValueError(
                    f"embed_tokens in {path} has shape {tuple(saved.shape)}; expected {tuple(weight.shape)} "
                    f"or ({len(ids)}, {weight.shape[1]}) for the image start / end tokens"
                )
