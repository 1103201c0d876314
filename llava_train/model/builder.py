"""Model builder: a typed ``ModelConfig`` (Hydra schema) -> the family's LLaVA config -> its causal LM.

A preset (model/presets.py) fills every field left ``None``.

``build_model`` always goes LLM first, then ``initialize_vision_modules`` (the training path):
the LLM is random (from the preset sizes) or loaded from ``llm_path`` (a local checkpoint of the family);
the tower is random from the preset's CLIP config, or pretrained when ``vision_tower`` is set.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from llava_train.model import varlen
from llava_train.model.anyres import check_unpad_rounding
from llava_train.model.families import family_class
from llava_train.model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
from llava_train.model.presets import PRESETS
from llava_train.model.vision_tower import parse_s2_scales

_LLM_OVERRIDES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_MM_OVERRIDES = (
    "mm_projector_type",
    "mm_patch_merge_type",
    "mm_unpad_rounding",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "model_max_length",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config's ``dtype`` string (float32 | bfloat16 | float16)."""
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


varlen.register()  # transformers accepts attn_implementation=sdpa_varlen from here on

# attn_implementation -> (module providing its kernel, how to install it); None: torch itself
_ATTENTION = {
    "sdpa": None,
    "sdpa_varlen": None,  # model/varlen.py: one causal sdpa per packed sample, no [T, T] mask
    "eager": None,
    "flex_attention": None,
    "flash_attention_2": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "flash_attention_3": ("flash_attn_interface", "build hopper/ of the flash-attention repo"),
}


def check_attn_implementation(name: str) -> None:
    """Raise a ValueError naming the fix when ``name`` is unknown or cannot run here.

    Packed rows take a [b, 1, T, T] mask under sdpa / eager, one causal sdpa call per sample and no
    mask or padding under sdpa_varlen (model/varlen.py), a document-causal BlockMask under flex_attention
    (torch >= 2.5; no CPU backward) and none under flash-attention (varlen from the restarting position
    ids; needs the package and CUDA).
    """
    if name not in _ATTENTION:
        raise ValueError(f"model.attn_implementation={name!r}; use one of {sorted(_ATTENTION)}")
    if name == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise ValueError(
            f"model.attn_implementation=flex_attention needs torch >= 2.5 (this is {torch.__version__}): "
            "upgrade torch, or use model.attn_implementation=sdpa"
        )
    if _ATTENTION[name] is None:
        return
    module, install = _ATTENTION[name]
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"model.attn_implementation={name} needs the {module} package, which is not installed: "
            f"install it on a CUDA machine ({install}), or use model.attn_implementation=sdpa "
            "(or flex_attention on CUDA)"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"model.attn_implementation={name} needs a CUDA GPU and none is visible: run on a GPU, or use "
            "model.attn_implementation=sdpa on CPU"
        )


@dataclass
class ModelConfig:
    """Model config group. ``None`` means "take the preset's value"."""

    preset: str = "tiny"
    # LLM: a local HF LlamaForCausalLM directory; None = random init from the preset sizes.
    llm_path: str | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    max_position_embeddings: int | None = None
    # Vision: a pretrained CLIP (local dir / hub name); None = random tower from the preset's config.
    vision_tower: str | None = None
    # CLIPVisionConfig overrides for the random tower. A dict, not Optional: OmegaConf cannot merge a
    # command-line dict (`model.vision_config={hidden_size:128}`) into a None node.
    vision_config: dict = field(default_factory=dict)
    use_s2: bool = False
    s2_scales: str = "336,672,1008"
    mm_vision_select_layer: int | None = None
    mm_vision_select_feature: str | None = None
    mm_projector_type: str | None = None
    mm_patch_merge_type: str | None = None
    # round (transformers') | floor (the original's int()): the unpadded feature map's side (docs/FIDELITY.md)
    mm_unpad_rounding: str | None = None
    image_aspect_ratio: str | None = None
    image_grid_pinpoints: list | None = None
    model_max_length: int | None = None
    padding_side: str = "right"
    mm_use_im_start_end: bool = False
    mm_use_im_patch_token: bool = False
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    extra: dict = field(default_factory=dict)  # any LlamaConfig key, passed through (wins over the preset)

    def __post_init__(self) -> None:
        if self.mm_unpad_rounding is not None:
            check_unpad_rounding(self.mm_unpad_rounding)


def _preset(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown model preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[cfg.preset])


def _resolved_mm(cfg: ModelConfig, preset: dict[str, Any]) -> dict[str, Any]:
    mm = preset["mm"]
    for key in _MM_OVERRIDES:
        if getattr(cfg, key) is not None:
            mm[key] = copy.deepcopy(getattr(cfg, key))
    return mm


def _vision_config(cfg: ModelConfig, preset: dict[str, Any]) -> dict | None:
    if cfg.vision_tower is not None:
        return None  # pretrained tower: its own config
    return {**preset["vision_config"], **(cfg.vision_config or {})}


def _mm_hidden_size(cfg: ModelConfig, vision_config: dict | None) -> int | None:
    if vision_config is None:
        return None  # known once the pretrained tower is loaded
    scales = len(parse_s2_scales(cfg.s2_scales)) if cfg.use_s2 else 1
    return vision_config["hidden_size"] * scales


def build_llava_config(cfg: ModelConfig, vocab_size: int | None = None) -> LlavaConfig:
    """The full LlavaConfig (LLM sizes + mm_* keys) of ``cfg``; vocab from ``vocab_size`` or the preset."""
    preset = _preset(cfg)
    llm = preset["llm"]
    for key in _LLM_OVERRIDES:
        if getattr(cfg, key) is not None:
            llm[key] = getattr(cfg, key)
    if vocab_size is not None:
        llm["vocab_size"] = vocab_size
    mm = _resolved_mm(cfg, preset)
    vision_config = _vision_config(cfg, preset)
    config_class = family_class(preset.get("family", "llama")).config_class
    return config_class(
        **(llm | cfg.extra),  # extra may also override a preset's LlamaConfig key (tie_word_embeddings, ...)
        mm_vision_tower=cfg.vision_tower or preset["vision_name"],
        mm_vision_config=vision_config,
        mm_hidden_size=_mm_hidden_size(cfg, vision_config),
        mm_vision_select_layer=mm["mm_vision_select_layer"],
        mm_vision_select_feature=mm["mm_vision_select_feature"],
        mm_projector_type=mm["mm_projector_type"],
        mm_patch_merge_type=mm["mm_patch_merge_type"],
        mm_unpad_rounding=mm["mm_unpad_rounding"],
        image_aspect_ratio=mm["image_aspect_ratio"],
        image_grid_pinpoints=mm["image_grid_pinpoints"],
        tokenizer_model_max_length=mm["model_max_length"],
        tokenizer_padding_side=cfg.padding_side,
        mm_use_im_start_end=cfg.mm_use_im_start_end,
        mm_use_im_patch_token=cfg.mm_use_im_patch_token,
        use_mm_proj=True,
        use_s2=cfg.use_s2,
        s2_scales=cfg.s2_scales,
        attn_implementation=cfg.attn_implementation,
    )


def vision_args(config: LlavaConfig, cfg: ModelConfig) -> SimpleNamespace:
    """The ``model_args`` that ``initialize_vision_modules`` / ``initialize_vision_tokenizer`` read."""
    return SimpleNamespace(
        vision_tower=config.mm_vision_tower,
        mm_vision_config=config.mm_vision_config,
        mm_vision_select_layer=config.mm_vision_select_layer,
        mm_vision_select_feature=config.mm_vision_select_feature,
        mm_projector_type=config.mm_projector_type,
        mm_patch_merge_type=config.mm_patch_merge_type,
        use_s2=cfg.use_s2,
        s2_scales=cfg.s2_scales,
        mm_use_im_start_end=cfg.mm_use_im_start_end,
        mm_use_im_patch_token=cfg.mm_use_im_patch_token,
    )


def _build_llm(cfg: ModelConfig, config: LlavaConfig) -> LlavaLlamaForCausalLM:
    """The decoder alone (of the preset's family): loaded from ``llm_path`` or random from ``config``
    (mm keys stripped)."""
    model_class = family_class(_preset(cfg).get("family", "llama"))
    if cfg.llm_path is not None:
        return model_class.from_pretrained(
            cfg.llm_path, dtype=parse_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation
        )
    text_config = copy.deepcopy(config)
    text_config.mm_vision_tower = None
    # _from_config: under DeepSpeed ZeRO-3 (transformers' flag set) it builds under zero.Init, sharded.
    return model_class._from_config(text_config, dtype=parse_dtype(cfg.dtype))


_MM_CONFIG_KEYS = (
    "mm_unpad_rounding",
    "image_aspect_ratio",
    "image_grid_pinpoints",
    "tokenizer_model_max_length",
    "tokenizer_padding_side",
    "mm_use_im_start_end",
    "mm_use_im_patch_token",
)


def build_model(cfg: ModelConfig, tokenizer: Any = None) -> LlavaLlamaForCausalLM:
    """LLM, then vision modules, then the image tokens of ``tokenizer`` (vocab resized to fit it)."""
    parse_dtype(cfg.dtype)  # fail before anything is built
    check_attn_implementation(cfg.attn_implementation)
    vocab = len(tokenizer) if tokenizer is not None else None
    config = build_llava_config(cfg, vocab_size=vocab)
    model = _build_llm(cfg, config)
    args = vision_args(config, cfg)
    model.get_model().initialize_vision_modules(args)
    for key in _MM_CONFIG_KEYS:
        setattr(model.config, key, getattr(config, key))
    if tokenizer is not None:
        if len(tokenizer) > model.config.vocab_size:
            model.resize_token_embeddings(len(tokenizer))
        model.initialize_vision_tokenizer(args, tokenizer)
    return model
