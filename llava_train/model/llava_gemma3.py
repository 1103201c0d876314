"""LLaVA on a Gemma 3 text decoder (``llava_gemma3``): embeddings scaled by sqrt(hidden), interleaved sliding-window layers, tied lm_head."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Gemma3TextModel

from llava_train.model.llava_arch import LlavaMetaModel
from llava_train.model.llava_lm import LlavaConfigKeys, LlavaForCausalLMMixin


@strict
class LlavaGemma3Config(Gemma3TextConfig, LlavaConfigKeys):
    model_type = "llava_gemma3"


class LlavaGemma3Model(LlavaMetaModel, Gemma3TextModel):
    config_class = LlavaGemma3Config


class LlavaGemma3ForCausalLM(LlavaForCausalLMMixin, Gemma3ForCausalLM):
    config_class = LlavaGemma3Config
    base_model_class = LlavaGemma3Model
