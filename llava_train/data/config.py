"""Typed data configuration (Hydra-friendly: str/int/float/bool/Optional/list fields only)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass
class DataConfig:
    """Everything the data side needs; defaults are LLaVA-1.5 fine-tuning's.

    data_path: a LLaVA ``.json`` / ``.jsonl`` file, a ``.yaml`` mixture of such files, or a
        directory written by ``datasets.save_to_disk`` (or holding ``*.parquet`` files).
    image_folder: root that relative image paths resolve against; paths may not escape it.
    template: conversation template name (see conversation.TEMPLATES), e.g. plain for stage 1.
    strip_replies: drop whitespace around replies (False: keep it, as the original LLaVA).
    image_aspect_ratio: pad | square | anyres | anyres_max_N.
    image_grid_pinpoints: anyres canvases, a list string "[[w, h], ...]" or range "(1x1),...,(3x3)".
    bad_record_policy: strict (raise at the bad record) | skip (count, log, use the next good one).
    model_max_length: longest sample in tokens, image feature tokens included.
    max_image_pixels: decompression-bomb limit for one image (w * h).
    group_by_modality_length / group_by_length: which sampler the trainer builds.
    packing: pack samples into rows of model_max_length (data/packing.py); the per-device batch size
        then counts packed rows.
    seed: seeds the mixture sampling (random:N). The train sampler's order follows training.seed.
    """

    data_path: str = ""
    image_folder: str = ""
    template: str = "vicuna_v1"
    strip_replies: bool = True
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: str | None = None
    bad_record_policy: str = "strict"
    model_max_length: int = 2048
    max_image_pixels: int = 64_000_000
    group_by_modality_length: bool = False
    group_by_length: bool = False
    packing: bool = False
    num_workers: int = 2
    seed: int = 0
    streaming: bool = False
    # Where .json files get their JSONL index cache (None: ~/.cache/llava_train/json_index).
    cache_dir: str | None = None
    # Keys of the HF backend's columns; LLaVA JSON uses these names too.
    id_column: str = "id"
    image_column: str = "image"
    conversations_column: str = "conversations"

    def __post_init__(self) -> None:
        if self.bad_record_policy not in ("strict", "skip"):
            raise ValueError(f"bad_record_policy={self.bad_record_policy!r}; use 'strict' or 'skip'")
        if self.model_max_length <= 0:
            raise ValueError(f"model_max_length={self.model_max_length} must be positive")


@dataclass(frozen=True)
class VisionSpec:
    """What the data side must know of the model to count image feature tokens exactly.

    crop_size: the vision tower's input side S (336 for CLIP-L/14-336, 56 for the tiny tower).
    patches_per_side: P = S // patch size.
    mm_patch_merge_type: flat | spatial | spatial_unpad (as in the model config).
    mm_use_im_start_end: wrap each image placeholder in <im_start> ... <im_end>.
    cls_token: the tower's CLS feature is kept (mm_vision_select_feature cls_patch): P*P + 1 per crop.
    """

    crop_size: int = 336
    patches_per_side: int = 24
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False
    cls_token: bool = False

    @classmethod
    def from_model_config(cls, config: Any) -> VisionSpec:
        """Read a LlavaConfig-like object (mm_* keys; optional mm_vision_config dict)."""
        vision = getattr(config, "mm_vision_config", None) or {}
        if not isinstance(vision, dict):
            vision = vision.to_dict()
        name_patch, name_size = _sizes_from_tower_name(getattr(config, "mm_vision_tower", None) or "")
        crop = int(vision.get("image_size", name_size))
        patch = int(vision.get("patch_size", name_patch))
        return cls(
            crop_size=crop,
            patches_per_side=crop // patch,
            mm_patch_merge_type=getattr(config, "mm_patch_merge_type", "flat") or "flat",
            mm_use_im_start_end=bool(getattr(config, "mm_use_im_start_end", False)),
            cls_token=getattr(config, "mm_vision_select_feature", "patch") == "cls_patch",
        )


def _sizes_from_tower_name(name: str) -> tuple[int, int]:
    """(patch, image size) from a CLIP tower name like 'openai/clip-vit-large-patch14-336' (default 14, 336)."""
    match = re.search(r"patch(\d+)(?:-(\d+))?", name)
    if not match:
        return 14, 336
    return int(match.group(1)), int(match.group(2) or 224)
