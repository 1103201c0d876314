"""Typed data configuration (Hydra-friendly: str/int/float/bool/Optional/list fields only)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llava_train.model.anyres import (
    check_grid_pinpoints,
    check_unpad_rounding,
    is_anyres,
    num_image_tokens,
    parse_grid_pinpoints,
)


@dataclass
class DataConfig:
    """Everything the data side needs besides the model's image geometry; defaults are LLaVA-1.5's.

    The model owns the geometry (crop and patch size, CLS token, merge type, grid pinpoints, maximum
    length): the data side reads it from the built model as a :class:`VisionSpec`.

    data_path: a LLaVA ``.json`` / ``.jsonl`` file, a ``.yaml`` mixture of such files, or a
        directory written by ``datasets.save_to_disk`` (or holding ``*.parquet`` files).
    image_folder: root that relative image paths resolve against; paths may not escape it.
    template: conversation template name (see conversation.TEMPLATES), e.g. plain for stage 1.
    strip_replies: drop whitespace around replies (False: keep it, as the original LLaVA).
    image_aspect_ratio: None = the model's; pad or square override it with one crop per image (as
        LLaVA-1.6's stage 1 runs pad on an anyres model).
    bad_record_policy: strict (raise at the bad record) | skip (count, log, use the next good one).
    max_image_pixels: decompression-bomb limit for one image (w * h).
    group_by_modality_length / group_by_length: which sampler the trainer builds.
    packing: pack samples into rows of the model's maximum length (data/packing.py); the per-device
        batch size then counts packed rows.
    max_tokens_per_batch: token-budget micro-batches (data/sampler.py, TokenBudgetBatchSampler): as many rows
        (samples, or packed rows under ``packing``) as fit in rows x longest row <= this many tokens, exact
        lengths (image tokens included); replaces the per-device batch size and implies length grouping.
        A row longer than the budget is an error naming it: >= the model's maximum length always fits.
        None: off.
    num_workers: data-loader worker processes (0: load in the training process).
    worker_sharing: how workers hand batches to the training process (``torch.multiprocessing`` sharing
        strategy): file_system (default) names a shared-memory file per tensor; file_descriptor (torch's
        default) passes a descriptor per tensor over a fresh authenticated socket, about 1 ms each in the
        receiving process (docs/THROUGHPUT.md "Data-loader workers").
    seed: seeds the mixture sampling (random:N) and the train sampler's order.
    """

    data_path: str = ""
    image_folder: str = ""
    template: str = "vicuna_v1"
    strip_replies: bool = True
    image_aspect_ratio: str | None = None
    bad_record_policy: str = "strict"
    max_image_pixels: int = 64_000_000
    group_by_modality_length: bool = False
    group_by_length: bool = False
    packing: bool = False
    max_tokens_per_batch: int | None = None
    num_workers: int = 2
    worker_sharing: str = "file_system"
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
        if self.worker_sharing not in ("file_system", "file_descriptor"):
            raise ValueError(
                f"data.worker_sharing={self.worker_sharing!r}; use 'file_system' or 'file_descriptor'"
            )


@dataclass(frozen=True)
class VisionSpec:
    """The model's image geometry, as the data side needs it to crop images and count their tokens.

    Built from the model (:meth:`from_model`), never from a tower's name.
    crop_size: the vision tower's input side S (336 for CLIP-L/14-336, 56 for the tiny tower).
    patches_per_side: P = S // patch size.
    mm_patch_merge_type: flat | spatial | spatial_unpad (as in the model config).
    mm_use_im_start_end: wrap each image placeholder in <im_start> ... <im_end>.
    cls_token: the tower's CLS feature is kept (mm_vision_select_feature cls_patch): P*P + 1 per crop.
    image_aspect_ratio: pad | square | anyres | anyres_max_N.
    image_grid_pinpoints: anyres canvases, [[w, h], ...] or a range "(1x1),...,(3x3)".
    model_max_length: the longest sample in tokens, image feature tokens included (the model's
        truncation length).
    mm_unpad_rounding: round | floor, how the unpad sizes the grid's feature map (as in the model config).
    """

    crop_size: int = 336
    patches_per_side: int = 24
    mm_patch_merge_type: str = "flat"
    mm_use_im_start_end: bool = False
    cls_token: bool = False
    image_aspect_ratio: str = "pad"
    image_grid_pinpoints: Any = None
    model_max_length: int = 2048
    mm_unpad_rounding: str = "round"

    def __post_init__(self) -> None:
        if self.model_max_length <= 0:
            raise ValueError(f"model_max_length={self.model_max_length} must be positive")
        check_unpad_rounding(self.mm_unpad_rounding)
        if is_anyres(self.image_aspect_ratio):
            if not self.image_grid_pinpoints:
                raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio!r} needs image_grid_pinpoints")
            check_grid_pinpoints(self.image_grid_pinpoints, self.crop_size, "model.image_grid_pinpoints")
            # (w, h) canvases as a tuple: the spec is frozen (hashable), a range string is expanded once
            canvases = tuple(parse_grid_pinpoints(self.image_grid_pinpoints, self.crop_size))
            object.__setattr__(self, "image_grid_pinpoints", canvases)

    @classmethod
    def from_model(cls, model: Any) -> VisionSpec:
        """The geometry of a built LLaVA model (a PEFT wrapper is looked through)."""
        get_base = getattr(model, "get_base_model", None)
        base = get_base() if get_base else model
        config, tower = base.config, base.get_vision_tower()
        return cls(
            crop_size=tower.image_size,
            patches_per_side=tower.num_patches_per_side,
            mm_patch_merge_type=getattr(config, "mm_patch_merge_type", "flat") or "flat",
            mm_unpad_rounding=config.mm_unpad_rounding,
            mm_use_im_start_end=bool(getattr(config, "mm_use_im_start_end", False)),
            cls_token=tower.has_cls_token and getattr(tower, "select_feature", "patch") == "cls_patch",
            image_aspect_ratio=getattr(config, "image_aspect_ratio", "pad") or "pad",
            image_grid_pinpoints=getattr(config, "image_grid_pinpoints", None),
            model_max_length=getattr(config, "tokenizer_model_max_length", None) or 2048,
        )

    def image_tokens(self, size: tuple[int, int]) -> int:
        """Feature tokens the model inserts for one image of PIL ``size`` (w, h)."""
        return num_image_tokens(
            size,
            image_aspect_ratio=self.image_aspect_ratio,
            mm_patch_merge_type=self.mm_patch_merge_type,
            image_grid_pinpoints=self.image_grid_pinpoints,
            crop_size=self.crop_size,
            patches_per_side=self.patches_per_side,
            cls_token=self.cls_token,
            unpad_rounding=self.mm_unpad_rounding,
        )

    def with_aspect_ratio(self, image_aspect_ratio: str | None) -> VisionSpec:
        """This geometry with the data's ``image_aspect_ratio`` override (None keeps the model's).

        One crop per image (pad / square) is always possible; anyres data needs an anyres model.
        """
        if image_aspect_ratio is None or image_aspect_ratio == self.image_aspect_ratio:
            return self
        if is_anyres(image_aspect_ratio):
            raise ValueError(
                f"data.image_aspect_ratio={image_aspect_ratio!r} but the model merges "
                f"{self.image_aspect_ratio!r} images: leave data.image_aspect_ratio unset (the model's "
                "is used), or set model.image_aspect_ratio"
            )
        return dataclasses.replace(self, image_aspect_ratio=image_aspect_ratio)
