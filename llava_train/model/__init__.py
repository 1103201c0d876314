"""The LLaVA model package: vision tower, projector, anyres geometry, one LLaVA class per LLM family,
builders.

Importing it registers the families' model types (llava_llama, llava_mistral, llava_qwen, llava_qwen3,
llava_gemma3) with transformers' Auto classes (the package's own registration; idempotent).
"""

from llava_train.model.anyres import (
    get_anyres_image_grid_shape,
    num_image_tokens,
    select_best_resolution,
    unpad_image,
)
from llava_train.model.builder import ModelConfig, build_llava_config, build_model
from llava_train.model.families import FAMILIES, family_class, register_llava
from llava_train.model.llava_arch import LlavaMetaForCausalLM, LlavaMetaModel
from llava_train.model.llava_gemma3 import LlavaGemma3Config, LlavaGemma3ForCausalLM
from llava_train.model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM, LlavaLlamaModel
from llava_train.model.llava_mistral import LlavaMistralConfig, LlavaMistralForCausalLM
from llava_train.model.llava_qwen import LlavaQwenConfig, LlavaQwenForCausalLM
from llava_train.model.llava_qwen3 import LlavaQwen3Config, LlavaQwen3ForCausalLM
from llava_train.model.merge import merge_text_and_images
from llava_train.model.projector import build_vision_projector
from llava_train.model.vision_tower import (
    CLIPVisionTower,
    CLIPVisionTowerS2,
    SiglipVisionTower,
    VisionTower,
    build_vision_tower,
)

register_llava()

__all__ = [
    "CLIPVisionTower",
    "CLIPVisionTowerS2",
    "FAMILIES",
    "LlavaConfig",
    "LlavaGemma3Config",
    "LlavaGemma3ForCausalLM",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "LlavaMetaForCausalLM",
    "LlavaMetaModel",
    "LlavaMistralConfig",
    "LlavaMistralForCausalLM",
    "LlavaQwen3Config",
    "LlavaQwen3ForCausalLM",
    "LlavaQwenConfig",
    "LlavaQwenForCausalLM",
    "ModelConfig",
    "SiglipVisionTower",
    "VisionTower",
    "build_llava_config",
    "build_model",
    "build_vision_projector",
    "build_vision_tower",
    "family_class",
    "get_anyres_image_grid_shape",
    "merge_text_and_images",
    "num_image_tokens",
    "select_best_resolution",
    "unpad_image",
]
