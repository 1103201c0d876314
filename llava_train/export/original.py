"""Original LLaVA release files: full checkpoint directories and projector-only files.

A llava-v1.5 / v1.6 checkpoint directory (model_type "llava", ``mm_*`` config keys,
``model.mm_projector.*``, ``model.vision_tower.vision_tower.[vision_model.]*``) loads with the model
package's ``from_pretrained`` as it is; ``load_original`` adds the checks that make a wrong directory
fail with a reason. ``load_projector`` reads ``mm_projector.bin`` (``torch.load(weights_only=True)``)
or ``.safetensors`` into a model's projector.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from llava_train.model import FAMILIES, LlavaLlamaForCausalLM
from llava_train.model.projector import load_projector_weights, projector_state_from

# The released class names (LlavaLlamaForCausalLM, LlavaMistralForCausalLM, LlavaQwenForCausalLM) are ours.
_BY_ARCHITECTURE = {cls.__name__: cls for cls in FAMILIES.values()}
_BY_MODEL_TYPE = {cls.config_class.model_type: cls for cls in FAMILIES.values()}
ORIGINAL_MODEL_TYPES = ("llava", *_BY_MODEL_TYPE)


def _model_class(config: dict) -> type:
    """The family class of a checkpoint: its own model_type, or for model_type "llava" (the original releases:
    LLaVA-1.5, OneVision) the class its ``architectures`` names; Llama when it names none."""
    if config.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[config["model_type"]]
    named = [a for a in config.get("architectures") or [] if a in _BY_ARCHITECTURE]
    if config.get("architectures") and not named:
        raise ValueError(
            f"architectures {config['architectures']} names no LLaVA family class; known: {sorted(_BY_ARCHITECTURE)}"
        )
    return _BY_ARCHITECTURE[named[0]] if named else LlavaLlamaForCausalLM


def load_original(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlavaLlamaForCausalLM:
    """An original-layout (or our own) LLaVA checkpoint directory -> the model of its LLM family."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a model checkpoint directory")
    config = json.loads(config_file.read_text())
    if config.get("model_type") not in ORIGINAL_MODEL_TYPES or "mm_vision_tower" not in config:
        raise ValueError(
            f"{config_file}: model_type {config.get('model_type')!r} without mm_vision_tower is not an "
            "original LLaVA checkpoint; for a transformers-native llava dir use "
            "llava_train.export.import_hf"
        )
    model, info = _model_class(config).from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    bad = info["missing_keys"] or info["unexpected_keys"]
    if bad:
        raise ValueError(
            f"{path}: missing {sorted(info['missing_keys'])[:5]}, unexpected "
            f"{sorted(info['unexpected_keys'])[:5]}: the weights do not match the config"
        )
    return model.eval()


@torch.no_grad()
def load_projector(model: LlavaLlamaForCausalLM, path: str | os.PathLike) -> None:
    """Load a projector-only release file (``mm_projector.bin`` / ``.safetensors``) into ``model``."""
    projector = model.get_model().mm_projector
    state = projector_state_from(load_projector_weights(str(path)), projector, str(path))
    projector.load_state_dict(state)
