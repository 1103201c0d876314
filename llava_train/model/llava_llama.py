"""LLaVA on a Llama decoder (``llava_llama``): LLaVA-1.5 / 1.6-Vicuna, and any Llama-architecture LLM.

Module paths match the original checkpoints: ``model.embed_tokens``, ``model.layers``,
``model.vision_tower.vision_tower.*`` (CLIP), ``model.mm_projector.*``, ``model.image_newline``,
``lm_head``. A plain Llama checkpoint loads too (the mm weights are then missing and are built by
``initialize_vision_modules``). Everything multimodal is in the mixins (llava_arch.py, llava_lm.py).
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

from llava_train.model.llava_arch import LlavaMetaModel
from llava_train.model.llava_lm import LlavaConfigKeys, LlavaForCausalLMMixin


@strict
class LlavaConfig(LlamaConfig, LlavaConfigKeys):
    """LlamaConfig plus the original LLaVA ``mm_*`` keys and ``mm_vision_config`` (the tower's config dict)."""

    model_type = "llava_llama"


class LlavaLlamaModel(LlavaMetaModel, LlamaModel):
    """Llama decoder with the vision tower, projector and image newline attached."""

    config_class = LlavaConfig


class LlavaLlamaForCausalLM(LlavaForCausalLMMixin, LlamaForCausalLM):
    """Causal LM whose ``forward`` / ``generate`` take ``images`` and ``image_sizes``."""

    config_class = LlavaConfig
    base_model_class = LlavaLlamaModel
