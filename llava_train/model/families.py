"""The LLM families: one LLaVA causal-LM class each, by the name presets and docs use.

A family is chosen by name (``PRESETS[...]["family"]``), never by matching a model or tower name.
Adding one: a file like llava_mistral.py, an entry here, a preset in presets.py (docs/MODEL_FAMILIES.md).
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from llava_train.model.llava_gemma3 import LlavaGemma3ForCausalLM
from llava_train.model.llava_llama import LlavaLlamaForCausalLM
from llava_train.model.llava_mistral import LlavaMistralForCausalLM
from llava_train.model.llava_qwen import LlavaQwenForCausalLM
from llava_train.model.llava_qwen3 import LlavaQwen3ForCausalLM

FAMILIES: dict[str, type] = {
    "llama": LlavaLlamaForCausalLM,
    "mistral": LlavaMistralForCausalLM,
    "qwen2": LlavaQwenForCausalLM,
    "qwen3": LlavaQwen3ForCausalLM,
    "gemma3": LlavaGemma3ForCausalLM,
}


def family_class(name: str) -> type:
    """The LLaVA causal-LM class of family ``name``."""
    if name not in FAMILIES:
        raise ValueError(f"unknown LLM family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(config: object) -> str:
    """The family name of a LLaVA config (by its model_type: llava_llama, llava_mistral, ...)."""
    for name, cls in FAMILIES.items():
        if cls.config_class.model_type == getattr(config, "model_type", None):
            return name
    raise ValueError(f"{getattr(config, 'model_type', None)!r} is no LLaVA family model type")


def native_text_config_class(config: object) -> type:
    """transformers' own config class of the LLM under a LLaVA config (LlamaConfig, MistralConfig, ...)."""
    return FAMILIES[family_of(config)].config_class.__bases__[0]


def family_of_native(text_model_type: str) -> str:
    """The family whose decoder a transformers-native ``text_config.model_type`` names (llama, qwen2, ...)."""
    for name, cls in FAMILIES.items():
        if cls.config_class.__bases__[0].model_type == text_model_type:
            return name
    natives = sorted(c.config_class.__bases__[0].model_type for c in FAMILIES.values())
    raise ValueError(f"text_config.model_type {text_model_type!r}: no LLaVA family has it (one of {natives})")


def register_llava() -> None:
    """Register every family's model type with AutoConfig / AutoModelForCausalLM (idempotent)."""
    for cls in FAMILIES.values():
        AutoConfig.register(cls.config_class.model_type, cls.config_class, exist_ok=True)
        AutoModelForCausalLM.register(cls.config_class, cls, exist_ok=True)
