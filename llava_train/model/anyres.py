"""Anyres geometry shared by the data side (lengths, crops) and the model side (merge).

Conventions (those of the original LLaVA code, not transformers'): every image size is a PIL
``(width, height)`` pair, and grid pinpoints are ``(width, height)`` pairs too. transformers'
LlavaNext uses ``(height, width)`` for both; the pinpoint lists LLaVA ships are symmetric, so the two
agree once the pairs are swapped (see tests/test_anyres.py).

Notation: P = patches per side of the vision tower's square input (24 for CLIP-L/14 at 336),
a grid is (num_w, num_h) crops, and a feature map is [d, H, W] with H = num_h * P, W = num_w * P.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Size = tuple[int, int]  # (width, height)

_ANYRES_MAX = re.compile(r"^anyres_max_(\d+)$")


def select_best_resolution(original_size: Size, possible_resolutions: Sequence[Sequence[int]]) -> Size:
    """Pick the resolution that keeps the most of the image's pixels, then wastes the fewest.

    Args:
        original_size: (width, height) of the image.
        possible_resolutions: candidate (width, height) canvases.
    """
    orig_w, orig_h = original_size
    best, best_key = None, None
    for width, height in possible_resolutions:
        scale = min(width / orig_w, height / orig_h)
        down_w, down_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(down_w * down_h, orig_w * orig_h)
        wasted = width * height - effective
        key = (effective, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (int(width), int(height)), key
    if best is None:
        raise ValueError("select_best_resolution: possible_resolutions is empty")
    return best


def parse_grid_pinpoints(grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int) -> list[Size]:
    """Grid pinpoints as a list of (width, height) pixel canvases.

    Accepts a list of pairs, its string form, or LLaVA-NeXT's range form ``"(1x1),...,(6x6)"``,
    which expands to every grid between the two corners, times ``patch_size`` pixels per crop.
    """
    if isinstance(grid_pinpoints, str) and "x" in grid_pinpoints:
        corners = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", grid_pinpoints)]
        if len(corners) < 2:
            raise ValueError(
                f"cannot parse grid pinpoints range {grid_pinpoints!r}; expected '(1x1),...,(6x6)'"
            )
        (w0, h0), (w1, h1) = corners[0], corners[-1]
        return [(i * patch_size, j * patch_size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
    if isinstance(grid_pinpoints, str):
        grid_pinpoints = ast.literal_eval(grid_pinpoints)
    return [(int(w), int(h)) for w, h in grid_pinpoints]


def check_grid_pinpoints(grid_pinpoints: str | Sequence[Sequence[int]], crop_size: int, name: str) -> None:
    """Every canvas must be a positive multiple of the crop size on both sides: the merge reshapes the crops'
    features into that grid and fails in the first forward pass otherwise. `name`: the setting, for the fix."""
    canvases = parse_grid_pinpoints(grid_pinpoints, crop_size)
    bad = [(w, h) for w, h in canvases if w <= 0 or h <= 0 or w % crop_size or h % crop_size]
    if bad:
        fixed = sorted({(max(1, round(w / crop_size)) * crop_size, max(1, round(h / crop_size)) * crop_size)
                        for w, h in canvases})  # fmt: skip
        raise ValueError(
            f"{name}: canvases {bad} are not positive multiples of the vision tower's crop size {crop_size} "
            f"on both sides. Use multiples of {crop_size}, e.g. {[list(c) for c in fixed]}, or the range form "
            "'(1x1),...,(3x3)' (in crops)."
        )


def get_anyres_image_grid_shape(
    image_size: Size, grid_pinpoints: str | Sequence[Sequence[int]], patch_size: int
) -> tuple[int, int]:
    """Number of crops (num_w, num_h) an image of ``image_size`` (w, h) is split into.

    ``patch_size`` here is the vision tower's input resolution (one crop), as in the original.
    """
    width, height = select_best_resolution(image_size, parse_grid_pinpoints(grid_pinpoints, patch_size))
    return width // patch_size, height // patch_size


UNPAD_ROUNDINGS = ("round", "floor")


def check_unpad_rounding(rounding: str) -> str:
    """``rounding`` if it is one of :data:`UNPAD_ROUNDINGS`; a ValueError naming the fix otherwise."""
    if rounding not in UNPAD_ROUNDINGS:
        raise ValueError(
            f"mm_unpad_rounding={rounding!r}; use 'round' (transformers' LlavaNext, the default) or 'floor' "
            "(the original LLaVA / LLaVA-NeXT int(), as the released v1.6 and OneVision checkpoints trained)"
        )
    return rounding


def _scaled_side(side: int, scale: float, rounding: str) -> int:
    """``int(side * scale)``, rounded to 7 decimals first with ``round`` (float error: 335.999... -> 336)."""
    exact = side * scale
    return int(round(exact, 7)) if check_unpad_rounding(rounding) == "round" else int(exact)


def unpadded_shape(height: int, width: int, original_size: Size, rounding: str = "round") -> tuple[int, int]:
    """(H', W') left after removing the letterbox padding from a [.., height, width] feature map.

    The image of ``original_size`` (w, h) was resized to fit (width, height) and centred; the
    padding is removed symmetrically. ``rounding`` (the config's ``mm_unpad_rounding``): ``round``
    rounds the scaled side to 7 decimals before ``int()``, as transformers does; ``floor`` is the
    original's plain ``int()``, which can cut two more rows (or columns) when e.g. 47 * (12 / 188)
    = 2.9999999999999996 (docs/FIDELITY.md).
    """
    orig_w, orig_h = original_size
    if orig_w / orig_h > width / height:
        new_h = _scaled_side(orig_h, width / orig_w, rounding)
        pad = (height - new_h) // 2
        return height - 2 * pad, width
    new_w = _scaled_side(orig_w, height / orig_h, rounding)
    pad = (width - new_w) // 2
    return height, width - 2 * pad


def unpad_image(tensor: torch.Tensor, original_size: Size, rounding: str = "round") -> torch.Tensor:
    """Crop the padding off a [c, H, W] feature map of an image whose size was (w, h)."""
    height, width = tensor.shape[-2:]
    new_h, new_w = unpadded_shape(height, width, original_size, rounding)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    return tensor[..., top : top + new_h, left : left + new_w]


def anyres_max_patches(image_aspect_ratio: str | None) -> int | None:
    """N of LLaVA-NeXT's ``anyres_max_N``; None for any other aspect-ratio mode."""
    match = _ANYRES_MAX.match(image_aspect_ratio or "")
    return int(match.group(1)) if match else None


def is_anyres(image_aspect_ratio: str | None) -> bool:
    return image_aspect_ratio == "anyres" or anyres_max_patches(image_aspect_ratio) is not None


def anyres_max_shape(height: int, width: int, max_num_patches: int, patches_per_side: int) -> tuple[int, int]:
    """Shape after LLaVA-NeXT's ``anyres_max_N`` down-scaling of an unpadded [d, H, W] map.

    When the map holds more than about N base grids (ratio > 1.1), it is bilinearly resized so
    that it holds about N.
    """
    ratio = math.sqrt(height * width / (max_num_patches * patches_per_side**2))
    if ratio > 1.1:
        return int(height // ratio), int(width // ratio)
    return height, width


def anyres_max_downscale(feature: torch.Tensor, max_num_patches: int, patches_per_side: int) -> torch.Tensor:
    """Apply :func:`anyres_max_shape` to a [d, H, W] feature map."""
    height, width = feature.shape[-2:]
    new_shape = anyres_max_shape(height, width, max_num_patches, patches_per_side)
    if new_shape == (height, width):
        return feature
    return F.interpolate(feature[None], size=list(new_shape), mode="bilinear")[0]


def num_image_tokens(
    image_size: Size,
    *,
    image_aspect_ratio: str,
    mm_patch_merge_type: str,
    image_grid_pinpoints: str | Sequence[Sequence[int]] | None,
    crop_size: int,
    patches_per_side: int,
    cls_token: bool = False,
    unpad_rounding: str = "round",
) -> int:
    """Exact number of feature tokens the model inserts for one image of ``image_size`` (w, h).

    Mirrors the merge in ``LlavaMetaForCausalLM``: non-anyres images arrive stacked and are
    always flat (P*P tokens, + 1 with ``cls_token``: select_feature cls_patch); anyres images arrive
    as [1 + crops, 3, s, s] and are merged per ``mm_patch_merge_type``; ``unpad_rounding`` is the
    config's ``mm_unpad_rounding`` (see :func:`unpadded_shape`).
    """
    base = patches_per_side**2 + int(cls_token)
    if not is_anyres(image_aspect_ratio):
        return base
    num_w, num_h = get_anyres_image_grid_shape(image_size, image_grid_pinpoints, crop_size)
    if mm_patch_merge_type == "flat":
        return base + num_w * num_h * base
    if cls_token:
        raise ValueError(f"mm_vision_select_feature=cls_patch has no {mm_patch_merge_type} merge; use flat")
    if mm_patch_merge_type == "spatial":
        return base + num_w * num_h * base
    if mm_patch_merge_type.startswith("spatial") and "unpad" in mm_patch_merge_type:
        height, width = unpadded_shape(
            num_h * patches_per_side, num_w * patches_per_side, image_size, unpad_rounding
        )
        max_patches = anyres_max_patches(image_aspect_ratio)
        if max_patches is not None:
            height, width = anyres_max_shape(height, width, max_patches, patches_per_side)
        return base + height * (width + 1)
    raise ValueError(
        f"unknown mm_patch_merge_type {mm_patch_merge_type!r}; use flat, spatial or spatial_unpad"
    )
