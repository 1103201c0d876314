"""LLaVA on a Qwen2 / Qwen2.5 decoder: ``llava_qwen`` / ``LlavaQwenForCausalLM``, as LLaVA-OneVision was released."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

from llava_train.model.llava_arch import LlavaMetaModel
from llava_train.model.llava_lm import LlavaConfigKeys, LlavaForCausalLMMixin


@strict
class LlavaQwenConfig(Qwen2Config, LlavaConfigKeys):
    model_type = "llava_qwen"


class LlavaQwenModel(LlavaMetaModel, Qwen2Model):
    config_class = LlavaQwenConfig


class LlavaQwenForCausalLM(LlavaForCausalLMMixin, Qwen2ForCausalLM):
    config_class = LlavaQwenConfig
    base_model_class = LlavaQwenModel
