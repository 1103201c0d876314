"""Model presets: the LLM family and sizes, the vision tower's config, and the multimodal settings.

Every field of a ``ModelConfig`` left ``None`` takes the preset's value. The tower config is written out
in every preset, so models build offline (and on the meta device). ``family`` names the LLM class
(model/families.py; llama when absent).
- ``tiny``: CLIP 56px / patch 14 (P=4), hidden 64, 2 layers; LLM hidden 128, 2 layers; anyres +
  spatial_unpad with small pinpoints. For tests and the demo; a few M parameters plus embeddings.
- ``tiny_mistral`` / ``tiny_qwen3`` / ``tiny_gemma3``: the tiny geometry on the other families' decoders;
  ``tiny_qwen2_siglip``: Qwen2 + a tiny SigLIP tower, anyres_max_4 over range pinpoints (OneVision's shape).
- ``gemma3-270m``: the real Gemma 3 270M (converted from its wheels) with the tiny SigLIP tower.
- ``llava-v1.5-7b``: Vicuna-7B + CLIP-L/14-336, pad, flat, mlp2x_gelu.
- ``llava-v1.6-vicuna-7b``: the seed's section-2 table (anyres, spatial_unpad, pinpoints, ...), with the
  original's floor in the unpad (``mm_unpad_rounding``; the tiny presets round, as transformers).
- ``llava-v1.6-mistral-7b``: Mistral-7B-Instruct-v0.2 + CLIP-L/14-336, as v1.6-vicuna otherwise.
- ``llava-onevision-qwen2-7b``: Qwen2-7B + SigLIP-so400m/14-384 (last layer dropped), anyres_max_9 over
  the (1x1)..(6x6) grids, spatial_unpad, floor unpad rounding.
"""

from __future__ import annotations

from typing import Any

from llava_train.model.vision_tower import BUILTIN_VISION_CONFIGS

CLIP_L336 = "openai/clip-vit-large-patch14-336"
_VICUNA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
    hidden_act="silu",
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    attention_bias=False,
    attention_dropout=0.0,
    pretraining_tp=1,
    use_cache=True,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Mistral-7B-Instruct-v0.2, LLaVA-1.6-Mistral's LLM (docs/MODEL_FAMILIES.md gives the sources)
_MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    sliding_window=None,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
# Qwen2-7B-Instruct as LLaVA-OneVision-7B's config.json records it
_QWEN2_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=32768,
    max_window_layers=28,
    vocab_size=152064,
    rms_norm_eps=1e-6,
    use_sliding_window=False,
    sliding_window=131072,
    bos_token_id=151643,
    eos_token_id=151645,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
SIGLIP_SO400M = "google/siglip-so400m-patch14-384"
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# LLaVA-1.6's multimodal settings (the seed's section-2 table), shared by its Vicuna and Mistral releases.
# mm_unpad_rounding "floor": the released checkpoints trained with the original's int() (docs/FIDELITY.md).
_V16_MM = dict(
    mm_projector_type="mlp2x_gelu",
    mm_patch_merge_type="spatial_unpad",
    mm_unpad_rounding="floor",
    image_aspect_ratio="anyres",
    image_grid_pinpoints=V16_PINPOINTS,
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    model_max_length=4096,
)

_TINY_LLM = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    vocab_size=32000,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def _tiny_llm(**family_keys: Any) -> dict[str, Any]:
    return {**_TINY_LLM, **family_keys}


_TINY: dict[str, Any] = dict(
    llm=_TINY_LLM,
    vision_name="tiny-clip-56",
    vision_config=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=64,
    ),
    mm=dict(
        mm_projector_type="mlp2x_gelu",
        mm_patch_merge_type="spatial_unpad",
        mm_unpad_rounding="round",
        image_aspect_ratio="anyres",
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        model_max_length=2048,
    ),
)


_TINY_SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=2,
    image_size=56,
    patch_size=14,
)
_TINY_SIGLIP_MM = dict(
    _TINY["mm"],
    image_aspect_ratio="anyres_max_4",
    image_grid_pinpoints="(1x1),...,(3x3)",
    mm_vision_select_layer=-2,
)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": _TINY,
    # The tiny geometry on the other decoder families (random, offline): tests train and export each one.
    "tiny_mistral": dict(_TINY, family="mistral", llm=_tiny_llm(sliding_window=None)),
    "tiny_qwen3": dict(_TINY, family="qwen3", llm=_tiny_llm(head_dim=32, tie_word_embeddings=True)),
    "tiny_gemma3": dict(
        _TINY,
        family="gemma3",
        llm=_tiny_llm(
            head_dim=32,
            tie_word_embeddings=True,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=32,
        ),
    ),
    # Qwen2 + a tiny SigLIP tower (its last layer dropped, as LLaVA-NeXT does), OneVision's anyres_max_N
    # with range pinpoints, on the tiny geometry
    "tiny_qwen2_siglip": dict(
        family="qwen2",
        llm=_tiny_llm(tie_word_embeddings=True),
        vision_name="tiny-siglip-56",
        vision_config=_TINY_SIGLIP,
        mm=_TINY_SIGLIP_MM,
    ),
    # Gemma 3 270M (llava_train/pretrained.py converts it from its wheels) with the tiny SigLIP tower and
    # OneVision's merge: a second real LLM for the slow tests; sizes as the GGUF records them
    "gemma3-270m": dict(
        family="gemma3",
        llm=dict(
            hidden_size=640,
            intermediate_size=2048,
            num_hidden_layers=18,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            max_position_embeddings=32768,
            vocab_size=262144,
            rms_norm_eps=1e-6,
            sliding_window=512,
            query_pre_attn_scalar=256,
            layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3,
            tie_word_embeddings=True,
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        ),
        vision_name="tiny-siglip-56",
        vision_config=_TINY_SIGLIP,
        mm=_TINY_SIGLIP_MM,
    ),
    "llava-v1.5-7b": dict(
        llm=_VICUNA_7B,
        vision_name=CLIP_L336,
        vision_config=BUILTIN_VISION_CONFIGS[CLIP_L336],
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            mm_patch_merge_type="flat",
            mm_unpad_rounding="round",  # no unpad in a flat merge
            image_aspect_ratio="pad",
            image_grid_pinpoints=None,
            mm_vision_select_layer=-2,
            mm_vision_select_feature="patch",
            model_max_length=2048,
        ),
    ),
    "llava-v1.6-vicuna-7b": dict(
        llm=_VICUNA_7B,
        vision_name=CLIP_L336,
        vision_config=BUILTIN_VISION_CONFIGS[CLIP_L336],
        mm=_V16_MM,
    ),
    "llava-v1.6-mistral-7b": dict(
        family="mistral",
        llm=_MISTRAL_7B,
        vision_name=CLIP_L336,
        vision_config=BUILTIN_VISION_CONFIGS[CLIP_L336],
        mm=_V16_MM,
    ),
    "llava-onevision-qwen2-7b": dict(
        family="qwen2",
        llm=_QWEN2_7B,
        vision_name=SIGLIP_SO400M,
        vision_config=BUILTIN_VISION_CONFIGS[SIGLIP_SO400M],
        mm=dict(
            mm_projector_type="mlp2x_gelu",
            mm_patch_merge_type="spatial_unpad",
            mm_unpad_rounding="floor",  # LLaVA-NeXT's int(), as the release trained (docs/FIDELITY.md)
            image_aspect_ratio="anyres_max_9",
            image_grid_pinpoints="(1x1),...,(6x6)",
            mm_vision_select_layer=-2,
            mm_vision_select_feature="patch",
            model_max_length=32768,
        ),
    ),
}
