"""The LLaVA model package: vision tower, projector, anyres geometry, LLaVA-Llama, builders.

Importing it registers the "llava_llama" model type with transformers' Auto classes (the
package's own registration; idempotent).
"""

from llava_train.model.anyres import (
    get_anyres_image_grid_shape,
    num_image_tokens,
    select_best_resolution,
    unpad_image,
)
from llava_train.model.builder import ModelConfig, build_llava_config, build_model
from llava_train.model.llava_arch import (
    LlavaMetaForCausalLM,
    LlavaMetaModel,
    merge_text_and_images,
)
from llava_train.model.llava_llama import (
    LlavaConfig,
    LlavaLlamaForCausalLM,
    LlavaLlamaModel,
    register_llava,
)
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
    "LlavaConfig",
    "LlavaLlamaForCausalLM",
    "LlavaLlamaModel",
    "LlavaMetaForCausalLM",
    "LlavaMetaModel",
    "ModelConfig",
    "SiglipVisionTower",
    "VisionTower",
    "build_llava_config",
    "build_model",
    "build_vision_projector",
    "build_vision_tower",
    "get_anyres_image_grid_shape",
    "merge_text_and_images",
    "num_image_tokens",
    "select_best_resolution",
    "unpad_image",
]
