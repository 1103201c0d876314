"""LLaVA on a Qwen3 decoder (``llava_qwen3``): Qwen2 with per-head q / k RMSNorm and no attention bias."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from llava_train.model.llava_arch import LlavaMetaModel
from llava_train.model.llava_lm import LlavaConfigKeys, LlavaForCausalLMMixin


@strict
class LlavaQwen3Config(Qwen3Config, LlavaConfigKeys):
    model_type = "llava_qwen3"


class LlavaQwen3Model(LlavaMetaModel, Qwen3Model):
    config_class = LlavaQwen3Config


class LlavaQwen3ForCausalLM(LlavaForCausalLMMixin, Qwen3ForCausalLM):
    config_class = LlavaQwen3Config
    base_model_class = LlavaQwen3Model
