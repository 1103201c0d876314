"""Vision towers: a CLIP ViT that turns pixels into patch features, and its multiscale (S2) form.

Notation: n images, S crop side in pixels (the tower's input resolution), P = S / patch_size patches
per side, d the tower's hidden size.

The transformers ``CLIPVisionModel`` lives at ``.vision_tower`` so that, inside the LLaVA model,
state-dict keys read ``model.vision_tower.vision_tower.*`` as in the original checkpoints.

Freezing is the stage code's business (``requires_grad_(False)``): nothing here runs under
``torch.no_grad``, so the tower can be unfrozen and fine-tuned.

Where the tower's configuration comes from, first match wins:
1. ``mm_vision_config`` (a CLIPVisionConfig dict on the LLaVA config): built from it, random init;
   a checkpoint loaded with ``from_pretrained`` then fills in the weights. No hub access.
2. ``delay_load=True`` (building inside ``LlavaLlamaForCausalLM.from_pretrained``): built from the
   tower's config only (a built-in copy for the OpenAI CLIP-L towers, or a local dir), so that the
   tower weights stored in every llava-v1.5/1.6 checkpoint load into it.
3. otherwise ``CLIPVisionModel.from_pretrained(mm_vision_tower)`` (a local dir or the hub cache).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

_CLIP_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# Configs of the towers the original LLaVA releases use, so they build offline (meta device, tests).
BUILTIN_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
}


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_processor(image_size: int) -> Any:
    """A CLIP image processor for an S x S tower (resize shortest edge to S, centre crop, CLIP mean/std)."""
    try:  # the PIL backend: no torchvision needed
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as cls
    return cls(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def resolve_vision_config(name_or_path: str, config_dict: dict | None = None) -> CLIPVisionConfig:
    """The CLIPVisionConfig of a tower: from ``config_dict``, the built-in table, or ``name_or_path``."""
    if config_dict is not None:
        return CLIPVisionConfig(**config_dict)
    if name_or_path in BUILTIN_VISION_CONFIGS:
        return CLIPVisionConfig(**BUILTIN_VISION_CONFIGS[name_or_path])
    try:
        return CLIPVisionConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"cannot read a CLIP vision config from {name_or_path!r}: pass a local directory, one of "
            f"{sorted(BUILTIN_VISION_CONFIGS)}, or set mm_vision_config (a CLIPVisionConfig dict)"
        ) from err


class CLIPVisionTower(nn.Module):
    """CLIP ViT feature extractor: [n, 3, S, S] pixels -> [n, P*P (+1 with cls_patch), d] features."""

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.vision_tower_name = vision_tower
        self.select_layer: int = getattr(args, "mm_vision_select_layer", -2)
        self.select_feature: str = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"mm_vision_select_feature={self.select_feature!r}; use 'patch' or 'cls_patch'")
        self.is_loaded = False
        config_dict = getattr(args, "mm_vision_config", None)
        if config_dict is None and not delay_load:
            self.load_model()
            return
        # Config only (no weight download): random init, weights come from a checkpoint if any.
        self.cfg_only = resolve_vision_config(vision_tower, config_dict)
        self.vision_tower = CLIPVisionModel(self.cfg_only)
        self.is_loaded = True

    def load_model(self, device_map: Any = None) -> None:
        """Load pretrained tower weights from ``vision_tower_name``; a no-op when already built."""
        if self.is_loaded:
            return
        self.vision_tower = CLIPVisionModel.from_pretrained(self.vision_tower_name, device_map=device_map)
        self.is_loaded = True

    def feature_select(self, hidden_states: tuple[torch.Tensor, ...]) -> torch.Tensor:
        features = hidden_states[self.select_layer]  # [n, 1 + P*P, d]
        return features[:, 1:] if self.select_feature == "patch" else features

    def forward_feature(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, tokens, d] in the dtype of ``images``."""
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return self.feature_select(out.hidden_states).to(images.dtype)

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(images, list):
            return [self.forward_feature(image[None]) for image in images]
        return self.forward_feature(images)

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        """Side S of the square images ``forward`` expects."""
        return self.config.image_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    def image_processor(self) -> Any:
        """The processor that makes this tower's pixels (the data side and evaluation use it)."""
        return clip_image_processor(self.image_size)


def parse_s2_scales(scales: str | list[int]) -> list[int]:
    """``"336,672,1008"`` or a list -> sorted list of ints."""
    values = [int(s) for s in scales.split(",")] if isinstance(scales, str) else [int(s) for s in scales]
    return sorted(values)


class CLIPVisionTowerS2(CLIPVisionTower):
    """Multiscale (S2) CLIP tower: features at several scales, pooled to the base grid, concatenated.

    For each scale s (a multiple of the base crop side S): resize the [n, 3, s_max, s_max] input to s,
    cut it into (s/S)^2 crops, run the tower, stitch the patch grids into one [n, d, s/S*P, s/S*P] map,
    area-pool it to [n, d, P, P]. Output: [n, P*P, d * num_scales].
    """

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False) -> None:
        self.s2_scales = parse_s2_scales(getattr(args, "s2_scales", "336,672,1008"))
        super().__init__(vision_tower, args, delay_load)
        if self.select_feature != "patch":
            raise ValueError("CLIPVisionTowerS2 needs mm_vision_select_feature='patch' (no CLS in a grid)")
        base = self.config.image_size
        bad = [s for s in self.s2_scales if s % base]
        if self.s2_scales[0] != base or bad:
            raise ValueError(
                f"s2_scales {self.s2_scales} must start at the tower's image size {base} and be multiples of it"
            )

    def _forward_scale(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        n, side, p = images.shape[0], self.config.image_size, self.num_patches_per_side
        k = scale // side  # crops per side at this scale
        x = F.interpolate(images.float(), size=(scale, scale), mode="bicubic").to(images.dtype)
        crops = x.view(n, 3, k, side, k, side).permute(0, 2, 4, 1, 3, 5).reshape(n * k * k, 3, side, side)
        feats = self.forward_feature(crops)  # [n*k*k, P*P, d]
        d = feats.shape[-1]
        grid = feats.view(n, k, k, p, p, d).permute(0, 5, 1, 3, 2, 4).reshape(n, d, k * p, k * p)
        pooled = F.interpolate(grid.float(), size=(p, p), mode="area").to(feats.dtype)  # [n, d, P, P]
        return pooled.flatten(2).transpose(1, 2)  # [n, P*P, d]

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(images, list):
            return [self.forward(image[None]) for image in images]
        return torch.cat([self._forward_scale(images, s) for s in self.s2_scales], dim=-1)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size * len(self.s2_scales)

    @property
    def image_size(self) -> int:
        return self.s2_scales[-1]


def build_vision_tower(config: Any, delay_load: bool = False, **kwargs: Any) -> CLIPVisionTower:
    """The tower named by ``config.mm_vision_tower`` (or ``config.vision_tower``).

    A CLIP tower is recognised by a name containing "clip", a local directory, or an
    ``mm_vision_config``; ``use_s2=True`` picks the multiscale form.
    """
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("no vision tower: set mm_vision_tower (e.g. 'openai/clip-vit-large-patch14-336')")
    is_clip = "clip" in name.lower() or os.path.isdir(name) or getattr(config, "mm_vision_config", None)
    if not is_clip:
        raise ValueError(
            f"unknown vision tower {name!r}: only CLIP towers are supported (a name containing 'clip', "
            "a local CLIPVisionModel directory, or mm_vision_config set)"
        )
    tower_cls = CLIPVisionTowerS2 if getattr(config, "use_s2", False) else CLIPVisionTower
    return tower_cls(name, config, delay_load=delay_load, **kwargs)


__all__ = [
    "BUILTIN_VISION_CONFIGS",
    "CLIPVisionTower",
    "CLIPVisionTowerS2",
    "build_vision_tower",
    "resolve_vision_config",
]
