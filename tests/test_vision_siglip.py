"""SigLIP tower: LLaVA-NeXT's truncation, dispatch by config, geometry, processor, released key names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

from llava_train.constants import IMAGE_TOKEN_INDEX
from llava_train.data.image import process_images, processor_crop_size
from llava_train.model import (
    CLIPVisionTower,
    LlavaLlamaForCausalLM,
    ModelConfig,
    SiglipVisionTower,
    build_model,
    build_vision_tower,
    get_anyres_image_grid_shape,
)

TINY_SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                   num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=14)  # fmt: skip
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=28, patch_size=14)  # fmt: skip
SO400M = "google/siglip-so400m-patch14-384"


def _args(name="tiny-siglip", config=TINY_SIGLIP, **kw):
    return SimpleNamespace(mm_vision_tower=name, mm_vision_config=config, **kw)


def _full_tiny_siglip(seed: int = 0) -> SiglipVisionModel:
    """The released form of the tiny tower: all 3 layers and the pooling head."""
    torch.manual_seed(seed)
    config = {k: v for k, v in TINY_SIGLIP.items() if k != "model_type"}
    return SiglipVisionModel(SiglipVisionConfig(**config)).eval()


def test_features_are_layer_minus_2_of_the_released_tower():
    full = _full_tiny_siglip()
    tower = build_vision_tower(_args())
    assert isinstance(tower, SiglipVisionTower)
    assert len(tower.vision_tower.encoder.layers) == 2 and not hasattr(tower.vision_tower, "head")
    missing, unexpected = tower.vision_tower.load_state_dict(full.state_dict(), strict=False)
    assert not missing
    assert unexpected and all(k.startswith(("encoder.layers.2.", "head.")) for k in unexpected)
    images = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = full(images, output_hidden_states=True).hidden_states[-2]  # [3, 16, 32], no CLS
        got = tower(images)
    assert got.shape == (3, 16, 32)
    torch.testing.assert_close(got, want)
    per_image = tower(list(images))
    assert len(per_image) == 3 and per_image[1].shape == (1, 16, 32)


def test_geometry_is_asked_of_the_tower():
    siglip = build_vision_tower(_args())
    clip = build_vision_tower(_args("tiny-clip", TINY_CLIP, mm_vision_select_layer=-2))
    assert isinstance(clip, CLIPVisionTower) and not isinstance(clip, SiglipVisionTower)
    for tower, want in ((siglip, (False, 56, 14, 4, 32)), (clip, (True, 28, 14, 2, 32))):
        got = (tower.has_cls_token, tower.image_size, tower.patch_size, tower.num_patches_per_side)
        assert got + (tower.hidden_size,) == want
    assert siglip.num_patches == 16 and siglip.dummy_feature.shape == (1, 32)
    assert siglip.config.num_hidden_layers == 2 and siglip.config.vision_use_head is False


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mm_vision_select_layer=-1), "mm_vision_select_layer=-2"),
        (dict(mm_vision_select_feature="cls_patch"), "no CLS token"),
        (dict(use_s2=True), "use_s2=True needs a CLIP tower"),
    ],
)
def test_unsupported_siglip_options_fail_with_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        build_vision_tower(_args(**kw))


def test_dispatch_reads_model_type_not_the_name():
    # A SigLIP config under a name that says "clip", and a CLIP config (no model_type) under "siglip".
    assert isinstance(build_vision_tower(_args("my-clip-tower")), SiglipVisionTower)
    assert type(build_vision_tower(_args("my-siglip", TINY_CLIP))) is CLIPVisionTower
    naflex = {**TINY_SIGLIP, "model_type": "siglip2_vision_model"}
    with pytest.raises(ValueError, match="NaFlex"):
        build_vision_tower(_args(config=naflex))
    with pytest.raises(ValueError, match="unknown vision tower .*mm_vision_config"):
        build_vision_tower(_args("no/such-tower", None), delay_load=True)


def test_processor_is_a_plain_resize_with_half_mean_std():
    tower = build_vision_tower(_args())
    processor = tower.image_processor()
    assert processor_crop_size(processor) == 56
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))  # 90 x 40, not square
    pixels, sizes = process_images([image], processor, "square")
    want = np.asarray(image.resize((56, 56), Image.BICUBIC), dtype=np.float32) / 255.0
    want = torch.from_numpy((want - 0.5) / 0.5).permute(2, 0, 1)
    assert pixels.shape == (1, 3, 56, 56) and sizes == [(90, 40)]
    torch.testing.assert_close(pixels[0], want, atol=1e-5, rtol=0)
    clip = build_vision_tower(_args("tiny-clip", TINY_CLIP))
    assert processor_crop_size(clip.image_processor()) == 28


@pytest.mark.parametrize("layout", ["vision_model", "siglip_model"])
def test_pretrained_dir_loads_into_the_truncated_tower(tmp_path, layout):
    """A SiglipVisionModel dir, or a full SiglipModel dir (text + vision) as google/siglip-* ship."""
    full = _full_tiny_siglip(seed=1)
    if layout == "siglip_model":
        text = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        )
        pair = SiglipModel(SiglipConfig(text_config=text, vision_config=full.config.to_dict()))
        pair.vision_model.load_state_dict(full.state_dict())
        pair.save_pretrained(tmp_path)
    else:
        full.save_pretrained(tmp_path)
    tower = SiglipVisionTower(str(tmp_path), SimpleNamespace())
    assert len(tower.vision_tower.encoder.layers) == 2
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(tower(images), full(images, output_hidden_states=True).hidden_states[-2])
    shell = build_vision_tower(SimpleNamespace(mm_vision_tower=str(tmp_path)), delay_load=True)
    assert isinstance(shell, SiglipVisionTower) and shell.config.num_hidden_layers == 2


def released_siglip_tower_keys(layers: int, d: int, ff: int, positions: int, patch: int) -> dict[str, tuple]:
    """Tower keys and shapes of a LLaVA-OneVision checkpoint (26 layers kept, no head)."""
    prefix = "model.vision_tower.vision_tower.vision_model."
    keys = {
        "embeddings.patch_embedding.weight": (d, 3, patch, patch),
        "embeddings.patch_embedding.bias": (d,),
        "embeddings.position_embedding.weight": (positions, d),
        "post_layernorm.weight": (d,),
        "post_layernorm.bias": (d,),
    }
    for i in range(layers):
        block = f"encoder.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            keys |= {f"{block}{norm}.weight": (d,), f"{block}{norm}.bias": (d,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys |= {f"{block}self_attn.{proj}.weight": (d, d), f"{block}self_attn.{proj}.bias": (d,)}
        keys |= {f"{block}mlp.fc1.weight": (ff, d), f"{block}mlp.fc1.bias": (ff,)}
        keys |= {f"{block}mlp.fc2.weight": (d, ff), f"{block}mlp.fc2.bias": (d,)}
    return {prefix + k: v for k, v in keys.items()}


def test_so400m_builds_offline_with_the_released_names_and_shapes():
    with torch.device("meta"):
        tower = build_vision_tower(SimpleNamespace(mm_vision_tower=SO400M), delay_load=True)
    assert tower.num_patches_per_side == 27 and tower.image_size == 384 and tower.hidden_size == 1152
    ours = {
        "model.vision_tower.vision_tower.vision_model." + k: tuple(v.shape)
        for k, v in tower.vision_tower.state_dict().items()
    }
    assert ours == released_siglip_tower_keys(layers=26, d=1152, ff=4304, positions=729, patch=14)


def test_onevision_key_layout_loads_into_llava(tmp_path):
    """A checkpoint whose tower keys carry the released ``vision_tower.vision_tower.vision_model.`` level."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", vision_config=dict(TINY_SIGLIP))).eval()
    assert isinstance(model.get_model().get_vision_tower(), SiglipVisionTower)
    model.save_pretrained(tmp_path)
    tower = "model.vision_tower.vision_tower."
    state = load_file(str(tmp_path / "model.safetensors"))
    state = {k.replace(tower, tower + "vision_model."): v for k, v in state.items()}
    layers = {k for k in state if k.startswith(tower + "vision_model.encoder.layers.")}
    assert {k.split(".")[6] for k in layers} == {"0", "1"}  # 3-layer tower, last removed
    assert not any(".head." in k for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((tmp_path / "config.json").read_text())["mm_vision_config"]["num_hidden_layers"] == 3
    loaded, info = LlavaLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert len(loaded.get_model().get_vision_tower().vision_tower.encoder.layers) == 2
    size = (90, 40)  # (w, h), not square: anyres crops and unpadding run through the SigLIP grid
    num_w, num_h = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 56)
    images = [torch.randn(1 + num_w * num_h, 3, 56, 56)]
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 7]])
    with torch.no_grad():
        want = model(input_ids=ids, images=images, image_sizes=[size]).logits
        got = loaded.eval()(input_ids=ids, images=images, image_sizes=[size]).logits
    assert want.shape[1] > 4 + 16  # the image features were merged in
    torch.testing.assert_close(got, want, rtol=0, atol=0)
