"""Import of a transformers-native Llava / LlavaNext / LlavaOnevision checkpoint as our LLaVA model of its
LLM's family: the config back to the original's mm_* keys, the weights through hf_native's key table,
loaded strictly. The export side is hf_native.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from llava_train.export import hf_onevision
from llava_train.export.hf_native import _SELECT, from_native_state_dict, load_strict, swap_pinpoints
from llava_train.model import LlavaConfig, LlavaLlamaForCausalLM
from llava_train.model.families import family_class, family_of_native

logger = logging.getLogger(__name__)


def _check_importable(config: Any) -> None:
    problems = []
    if config.model_type not in ("llava", "llava_next", "llava_onevision"):
        problems.append(f"model_type {config.model_type!r} (need 'llava', 'llava_next' or 'llava_onevision')")
    try:
        family_of_native(config.text_config.model_type)
    except ValueError as err:
        problems.append(str(err))
    if config.model_type == "llava_onevision":
        problems += hf_onevision.check_importable(config)
    elif config.vision_config.model_type != "clip_vision_model":
        problems.append(f"vision_config.model_type {config.vision_config.model_type!r} (need CLIP)")
    if config.projector_hidden_act != "gelu" or not config.multimodal_projector_bias:
        problems.append("projector must be linear -> gelu -> linear with biases (our mlp2x_gelu)")
    if not isinstance(config.vision_feature_layer, int):
        problems.append(f"vision_feature_layer {config.vision_feature_layer!r}: one layer only")
    if problems:
        raise ValueError("cannot import this transformers-native checkpoint:\n  - " + "\n  - ".join(problems))


def _image_aspect_ratio(path: Path, model_type: str) -> str:
    """anyres for LlavaNext; pad when the saved image processor pads to square, else square."""
    if model_type == "llava_next":
        return "anyres"
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (path / name).is_file():
            data = json.loads((path / name).read_text())
            data = data.get("image_processor", data)
            return "pad" if data.get("do_pad", False) else "square"
    logger.warning("no image processor config in %s: assuming image_aspect_ratio='pad' (LLaVA-1.5)", path)
    return "pad"


def our_config(native: Any, aspect: str) -> LlavaConfig:
    """Our LlavaConfig (original mm_* keys) for a native config."""
    text, vision = native.text_config.to_dict(), native.vision_config.to_dict()
    for key in ("model_type", "architectures", "_name_or_path", "transformers_version"):
        text.pop(key, None)
    is_next = native.model_type == "llava_next"
    select = {v: k for k, v in _SELECT.items()}[native.vision_feature_select_strategy]
    config_class = family_class(family_of_native(native.text_config.model_type)).config_class
    if native.model_type == "llava_onevision":
        mm = hf_onevision.our_mm_fields(native)
        return config_class(**text, **mm, mm_projector_type="mlp2x_gelu", use_mm_proj=True)
    return config_class(
        **text,
        mm_vision_tower=vision.get("_name_or_path") or "clip-vision-from-native",
        mm_vision_config={k: v for k, v in vision.items() if k not in ("model_type", "transformers_version")},
        mm_hidden_size=vision["hidden_size"],
        mm_vision_select_layer=native.vision_feature_layer,
        mm_vision_select_feature=select,
        mm_projector_type="mlp2x_gelu",
        mm_patch_merge_type="spatial_unpad" if is_next else "flat",
        mm_unpad_rounding="round",  # transformers' unpad
        image_aspect_ratio=aspect,
        image_grid_pinpoints=swap_pinpoints(native.image_grid_pinpoints) if is_next else None,
        use_mm_proj=True,
    )


def import_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlavaLlamaForCausalLM:
    """A transformers-native llava / llava_next checkpoint dir -> our LLaVA model of its LLM's family.

    The native vocab (with its ``<image>`` row) is kept, so logits match the native model column for
    column; prompts still use IMAGE_TOKEN_INDEX placeholders, as everywhere in this package.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(path)
    native_cfg = AutoConfig.from_pretrained(path)
    _check_importable(native_cfg)
    native = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    config = our_config(native_cfg, _image_aspect_ratio(path, native_cfg.model_type))
    model = family_class(family_of_native(native_cfg.text_config.model_type))(config)
    model = model.to(dtype)
    load_strict(model, from_native_state_dict(native.state_dict()), f"import of {path}")
    return model.eval()
