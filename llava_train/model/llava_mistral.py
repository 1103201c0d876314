"""LLaVA on a Mistral decoder: ``llava_mistral`` / ``LlavaMistralForCausalLM``, as LLaVA-1.6-Mistral was released."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MistralConfig, MistralForCausalLM, MistralModel

from llava_train.model.llava_arch import LlavaMetaModel
from llava_train.model.llava_lm import LlavaConfigKeys, LlavaForCausalLMMixin


@strict
class LlavaMistralConfig(MistralConfig, LlavaConfigKeys):
    model_type = "llava_mistral"


class LlavaMistralModel(LlavaMetaModel, MistralModel):
    config_class = LlavaMistralConfig


class LlavaMistralForCausalLM(LlavaForCausalLMMixin, MistralForCausalLM):
    config_class = LlavaMistralConfig
    base_model_class = LlavaMistralModel
