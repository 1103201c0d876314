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

from llava_train.model import LlavaLlamaForCausalLM
from llava_train.model.projector import load_projector_weights, projector_state_from

ORIGINAL_MODEL_TYPES = ("llava", "llava_llama")


def load_original(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlavaLlamaForCausalLM:
    """An original-layout (or our own) LLaVA-Llama checkpoint directory -> ``LlavaLlamaForCausalLM``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: not a model checkpoint directory")
    config = json.loads(config_file.read_text())
    if config.get("model_type") not in ORIGINAL_MODEL_TYPES or "mm_vision_tower" not in config:
        raise ValueError(
            f"{config_file}: model_type {config.get('model_type')!r} without mm_vision_tower is not an "
            "original LLaVA-Llama checkpoint; for a transformers-native llava dir use "
            "llava_train.export.import_hf"
        )
    model, info = LlavaLlamaForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
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
