"""Vision towers: a CLIP or SigLIP ViT that turns pixels into patch features; CLIP's multiscale (S2) form.

Notation: n images, S crop side in pixels (the tower's input resolution), P = S / patch_size patches
per side, d the tower's hidden size.

The transformers model lives at ``.vision_tower`` so that, inside the LLaVA model, state-dict keys
read ``model.vision_tower.vision_tower.*`` as in the original checkpoints (their older
``vision_model.`` level is dropped on load by transformers' own key conversion for both towers).

Every tower answers the same questions, so callers ask the built tower instead of parsing its
name: ``image_size`` (S), ``patch_size``, ``num_patches_per_side`` (P), ``num_patches``,
``hidden_size`` (d), ``has_cls_token``, and ``image_processor()`` (its pixel preprocessing).

Which tower: the ``model_type`` of its config (``mm_vision_config``, the built-in table below, or
the config.json of a local directory / hub cache entry). A dict without ``model_type`` is CLIP.
- CLIP (``clip_vision_model``): features are ``hidden_states[mm_vision_select_layer]``, CLS dropped
  unless ``mm_vision_select_feature="cls_patch"``; mean/std of OpenAI CLIP, shortest-edge resize and
  centre crop.
- SigLIP / SigLIP2 fixed-resolution (``siglip_vision_model``): no CLS token; as LLaVA-NeXT /
  LLaVA-OneVision, the last encoder layer and the pooling head are removed and the features are the
  output of the remaining last layer (before ``post_layernorm``), i.e. layer -2 of the released
  tower; mean/std 0.5, plain S x S resize. Its config describes the released (full) tower; the
  built module, and ``tower.config``, have one layer fewer and no head.

Freezing is the stage code's business (``requires_grad_(False)``): nothing here runs under
``torch.no_grad``, so the tower can be unfrozen and fine-tuned.

Where the tower's configuration comes from, first match wins:
1. ``mm_vision_config`` (a config dict on the LLaVA config): built from it, random init;
   a checkpoint loaded with ``from_pretrained`` then fills in the weights. No hub access.
2. ``delay_load=True`` (building inside ``from_pretrained`` of the LLaVA model): built from the
   tower's config only (a built-in copy for the towers the LLaVA releases use, or a local dir), so
   that the tower weights stored in every LLaVA checkpoint load into it.
3. otherwise ``from_pretrained(mm_vision_tower)`` of the tower's class (a local dir or the hub cache).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

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
# SigLIP So400m/14 at 384 px (google/siglip-so400m-patch14-384; LLaVA-NeXT's SigLipVisionConfig defaults).
# The SigLIP2 fixed-resolution release of the same shape uses the same architecture (model_type siglip).
_SIGLIP_SO400M_384 = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
# Configs of the towers the LLaVA releases use, so they build offline (meta device, tests).
BUILTIN_VISION_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {**_CLIP_L14, "image_size": 336},
    "openai/clip-vit-large-patch14": {**_CLIP_L14, "image_size": 224},
    "google/siglip-so400m-patch14-384": _SIGLIP_SO400M_384,
    "google/siglip2-so400m-patch14-384": _SIGLIP_SO400M_384,
}
CLIP_MODEL_TYPES = ("clip_vision_model", "clip")
SIGLIP_MODEL_TYPES = ("siglip_vision_model", "siglip")
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


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


def vision_model_type(name_or_path: str, config_dict: dict | None = None) -> str:
    """The tower config's ``model_type``: from ``config_dict``, the built-in table, or ``name_or_path``."""
    if config_dict is None:
        config_dict = BUILTIN_VISION_CONFIGS.get(name_or_path)
    if config_dict is not None:
        return config_dict.get("model_type", "clip_vision_model")
    try:
        return PretrainedConfig.get_config_dict(name_or_path)[0].get("model_type", "")
    except OSError as err:
        raise ValueError(
            f"unknown vision tower {name_or_path!r}: its config.json cannot be read; pass a local directory, "
            f"one of {sorted(BUILTIN_VISION_CONFIGS)}, or set mm_vision_config (a CLIP or SigLIP config dict)"
        ) from err


def resolve_vision_config(name_or_path: str, config_dict: dict | None = None) -> PretrainedConfig:
    """The tower's CLIPVisionConfig / SiglipVisionConfig from ``config_dict``, the table, or a dir."""
    model_type = vision_model_type(name_or_path, config_dict)
    config_cls = _config_class(model_type, name_or_path)
    if config_dict is None:
        config_dict = BUILTIN_VISION_CONFIGS.get(name_or_path)
    if config_dict is None:
        return config_cls.from_pretrained(name_or_path)
    return config_cls(**{k: v for k, v in config_dict.items() if k != "model_type"})


def _config_class(model_type: str, name: str) -> type[PretrainedConfig]:
    if model_type in CLIP_MODEL_TYPES:
        return CLIPVisionConfig
    if model_type in SIGLIP_MODEL_TYPES:
        return SiglipVisionConfig
    hint = ""
    if model_type.startswith("siglip2"):
        hint = (
            " SigLIP2 NaFlex towers (variable resolution) are not supported; the fixed-resolution SigLIP2 "
            "releases (e.g. google/siglip2-so400m-patch14-384) have model_type 'siglip' and load as SigLIP."
        )
    raise ValueError(
        f"vision tower {name!r} has model_type {model_type!r}; supported: "
        f"{CLIP_MODEL_TYPES + SIGLIP_MODEL_TYPES} (set 'model_type' in mm_vision_config).{hint}"
    )


class VisionTower(nn.Module):
    """What every tower shares: the transformers model at ``.vision_tower`` and the geometry it reports."""

    has_cls_token: bool = False

    def forward_feature(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(images, list):
            return [self.forward_feature(image[None]) for image in images]
        return self.forward_feature(images)

    def image_processor(self) -> Any:
        """The tower's preprocessing for S x S inputs (built from sizes, no hub access)."""
        raise NotImplementedError

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
    def config(self) -> PretrainedConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def image_size(self) -> int:
        """Side S of the square images ``forward`` expects."""
        return self.config.image_size

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2


class CLIPVisionTower(VisionTower):
    """CLIP ViT feature extractor: [n, 3, S, S] pixels -> [n, P*P (+1 with cls_patch), d] features."""

    has_cls_token = True

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

    def image_processor(self) -> Any:
        return clip_image_processor(self.image_size)


class SiglipVisionTower(VisionTower):
    """SigLIP ViT feature extractor: [n, 3, S, S] pixels -> [n, P*P, d], the last layer and head removed.

    ``mm_vision_select_layer`` counts layers of the released tower: -2 (the default, and what
    LLaVA-OneVision's config records) is the output of the last layer kept; nothing else is offered,
    since the removed layer is not there to select.
    """

    def __init__(self, vision_tower: str, args: Any, delay_load: bool = False) -> None:
        super().__init__()
        self.vision_tower_name = vision_tower
        select_layer = getattr(args, "mm_vision_select_layer", -2)
        select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if select_layer != -2 or select_feature != "patch":
            raise ValueError(
                f"SigLIP tower {vision_tower!r}: mm_vision_select_layer={select_layer}, "
                f"mm_vision_select_feature={select_feature!r}; a SigLIP tower (no CLS token, last layer "
                "removed as in LLaVA-NeXT) supports only mm_vision_select_layer=-2 and 'patch'"
            )
        self.is_loaded = False
        config_dict = getattr(args, "mm_vision_config", None)
        if config_dict is None and not delay_load:
            self.load_model()
            return
        self.cfg_only = truncated_siglip_config(resolve_vision_config(vision_tower, config_dict))
        self.vision_tower = SiglipVisionModel(self.cfg_only)
        self.is_loaded = True

    def load_model(self, device_map: Any = None) -> None:
        """Load pretrained weights from ``vision_tower_name`` into the truncated tower (no-op when built)."""
        if self.is_loaded:
            return
        released = resolve_vision_config(self.vision_tower_name)
        # The removed layer's and the head's weights are skipped as unexpected keys.
        self.vision_tower = SiglipVisionModel.from_pretrained(
            self.vision_tower_name, config=truncated_siglip_config(released), device_map=device_map
        )
        self.is_loaded = True

    def forward_feature(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, P*P, d] in the dtype of ``images``."""
        out = self.vision_tower(images.to(device=self.device, dtype=self.dtype), output_hidden_states=True)
        return out.hidden_states[-1].to(images.dtype)  # the last layer's output, before post_layernorm

    def image_processor(self) -> Any:
        try:  # the PIL backend: no torchvision needed
            from transformers import SiglipImageProcessorPil as cls
        except ImportError:  # older transformers
            from transformers import SiglipImageProcessor as cls
        side = self.image_size
        # crop_size is not used by SigLIP's processor (no centre crop); it states S for the data side.
        return cls(
            size={"height": side, "width": side},
            crop_size={"height": side, "width": side},
            image_mean=list(SIGLIP_MEAN),
            image_std=list(SIGLIP_STD),
            resample=3,  # bicubic
        )


def truncated_siglip_config(config: SiglipVisionConfig) -> SiglipVisionConfig:
    """``config`` with its last encoder layer and its pooling head removed (what LLaVA-NeXT runs)."""
    if config.num_hidden_layers < 2:
        raise ValueError(
            f"a SigLIP tower needs at least 2 layers (the last is removed); got {config.num_hidden_layers}"
        )
    out = SiglipVisionConfig(**{**config.to_dict(), "num_hidden_layers": config.num_hidden_layers - 1})
    out.vision_use_head = False
    return out


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


def build_vision_tower(config: Any, delay_load: bool = False, **kwargs: Any) -> VisionTower:
    """The tower named by ``config.mm_vision_tower`` (or ``config.vision_tower``), of its config's kind.

    The kind is the tower config's ``model_type`` (see the module docstring), never the name;
    ``use_s2=True`` picks CLIP's multiscale form.
    """
    name = getattr(config, "mm_vision_tower", None) or getattr(config, "vision_tower", None)
    if not name:
        raise ValueError("no vision tower: set mm_vision_tower (e.g. 'openai/clip-vit-large-patch14-336')")
    model_type = vision_model_type(name, getattr(config, "mm_vision_config", None))
    use_s2 = getattr(config, "use_s2", False)
    if _config_class(model_type, name) is SiglipVisionConfig:
        if use_s2:
            raise ValueError(f"use_s2=True needs a CLIP tower; {name!r} is SigLIP ({model_type})")
        return SiglipVisionTower(name, config, delay_load=delay_load, **kwargs)
    tower_cls = CLIPVisionTowerS2 if use_s2 else CLIPVisionTower
    return tower_cls(name, config, delay_load=delay_load, **kwargs)


__all__ = [
    "BUILTIN_VISION_CONFIGS",
    "CLIPVisionTower",
    "CLIPVisionTowerS2",
    "SiglipVisionTower",
    "VisionTower",
    "build_vision_tower",
    "resolve_vision_config",
    "truncated_siglip_config",
    "vision_model_type",
]
