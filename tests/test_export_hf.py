"""Export to / import from transformers' native Llava and LlavaNext: same logits, same greedy tokens.

Tolerances (fp32, CPU): logits max abs diff <= 1e-4 between our model and the native one on the same
pixel values; the processors' pixel values agree with our data pipeline to PIXEL_ATOL except where noted.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava_train.constants import IMAGE_TOKEN_INDEX
from llava_train.data import (
    load_tokenizer,
    process_images,
    render_prompt,
    tokenizer_image_token,
)
from llava_train.export import export_hf, import_hf, native_kind, to_native_model
from llava_train.export.hf_native import check_native_rounding
from llava_train.model import ModelConfig, build_llava_config, build_model
from llava_train.model.anyres import num_image_tokens, parse_grid_pinpoints

LOGITS_ATOL = 1e-4
TEMPLATE = "vicuna_v1"
TURNS = [("user", "<image>\nWhat is shown here?")]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]
FLAT = dict(mm_patch_merge_type="flat", image_aspect_ratio="pad")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mistral")


def _model(tokenizer, seed: int, preset: str = "tiny", **overrides):
    torch.manual_seed(seed)
    return build_model(ModelConfig(preset=preset, **overrides), tokenizer).eval()


def _image(width: int = 90, height: int = 50) -> Image.Image:
    """A non-square RGB image with structure (gradients + noise), seeded."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, width)[None, :, None] * torch.linspace(1, 0, height)[:, None, None]
    arr = (255 * (0.6 * x + 0.4 * torch.rand(height, width, 3, generator=g))).clamp(0, 255).byte()
    return Image.fromarray(arr.numpy(), "RGB")


def _ours_inputs(model, tokenizer, image):
    cfg = model.config
    prompt = render_prompt(TEMPLATE, TURNS, tokenizer=tokenizer)
    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")[None]  # [1, s]
    processor = model.get_vision_tower().image_processor()
    pixels, sizes = process_images([image], processor, cfg.image_aspect_ratio, cfg.image_grid_pinpoints)
    return ids, pixels, sizes


def _collapse(ids: torch.Tensor, image_id: int) -> tuple[list[int], int]:
    """Native ids (image token repeated per feature) -> ours (one IMAGE_TOKEN_INDEX), and the count."""
    out, count = [], 0
    for t in ids.tolist():
        if t == image_id:
            count += 1
            if out and out[-1] == IMAGE_TOKEN_INDEX:
                continue
            t = IMAGE_TOKEN_INDEX
        out.append(t)
    return out, count


def _native_pixels(pixels) -> torch.Tensor:
    """Our pixel layout -> native: [n, 3, S, S] stays, an anyres list becomes [n, 1 + crops, 3, S, S]."""
    return torch.stack(pixels) if isinstance(pixels, list) else pixels


def _roundtrip(model, tokenizer, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    export_hf(model, tokenizer, tmp_path, template=TEMPLATE)
    native = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    if native.config.model_type == "llava_onevision" and importlib.util.find_spec("torchvision") is None:
        return native, _onevision_processor_parts(tmp_path)
    # use_fast=False: the PIL image backend (training's pixels) also where torchvision is installed
    return native, AutoProcessor.from_pretrained(tmp_path, use_fast=False)


def _onevision_processor_parts(path):
    """What LlavaOnevisionProcessor does for one image, from the saved files, with transformers' code only.

    The processor object needs torchvision (its video processor), absent here: its image processor and
    tokenizer are loaded with the Auto classes and its own token count (``_get_number_of_features``,
    called on a stand-in holding the saved processor_config.json) expands ``<image>``.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor

    fields = json.loads((path / "processor_config.json").read_text())
    assert fields["processor_class"] == "LlavaOnevisionProcessor"
    image_processor = AutoImageProcessor.from_pretrained(path)
    assert type(image_processor).__name__.startswith("LlavaOnevisionImageProcessor")
    tok = AutoTokenizer.from_pretrained(path)
    counter = SimpleNamespace(image_processor=image_processor, **fields)
    counter._get_unpadded_features = functools.partial(
        LlavaOnevisionProcessor._get_unpadded_features, counter
    )

    def process(images, text, return_tensors):
        out = image_processor(images=[images], return_tensors=return_tensors)
        height, width = out["image_sizes"][0].tolist()
        side = out["pixel_values"].shape[-1]
        n = LlavaOnevisionProcessor._get_number_of_features(counter, height, width, side, side)
        n -= fields["vision_feature_select_strategy"] == "default"
        ids = tok(
            text.replace(fields["image_token"], fields["image_token"] * n), return_tensors=return_tensors
        )
        return {**out, **ids}

    process.tokenizer = tok  # the exported chat template is the tokenizer's
    return process


# (preset, native class): every LLM family exports to the native classes with its own text config
EXPORT_CASES = [
    ("tiny", "llava"),
    ("tiny", "llava_next"),
    ("tiny_mistral", "llava_next"),
    ("tiny_qwen3", "llava"),
    ("tiny_gemma3", "llava_next"),
    ("tiny_qwen2_siglip", "llava_onevision"),
]
# OneVision: an image large enough for anyres_max_4 to downscale its 3 x 2 grid of 56 px crops
IMAGE_SIZE = {"llava_onevision": (250, 150)}


@pytest.mark.parametrize("preset,kind", EXPORT_CASES)
def test_export_same_logits_and_greedy_tokens(tokenizer, tmp_path, preset, kind):
    model = _model(tokenizer, 0, preset, **(FLAT if kind == "llava" else {}))
    assert native_kind(model.config) == kind
    native, processor = _roundtrip(model, tokenizer, tmp_path)
    assert native.config.model_type == kind
    assert native.config.text_config.model_type == type(model.config).__bases__[0].model_type
    image = _image(*IMAGE_SIZE.get(kind, (90, 50)))
    ids, pixels, sizes = _ours_inputs(model, tokenizer, image)
    # the exported chat template builds the prompt; "▁" after the image as in training (non-legacy SP)
    text = processor.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=image, text=text, return_tensors="pt")
    if hasattr(processor, "apply_chat_template"):  # the OneVision stand-in (no torchvision) has none
        assert processor.apply_chat_template(MESSAGES, add_generation_prompt=True) == text
        direct = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": image}, *MESSAGES[0]["content"][1:]]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        assert torch.equal(direct["input_ids"], inputs["input_ids"])
    image_id = native.config.image_token_index

    # the processor: same text ids, as many image tokens as our merge makes, same pixels
    collapsed, count = _collapse(inputs["input_ids"][0], image_id)
    assert collapsed == ids[0].tolist()
    with torch.no_grad():
        n_features = model.image_features(pixels, sizes)[0].shape[0]
    assert count == n_features
    if kind == "llava_onevision":  # the anyres_max downscale did shrink the grid's feature map
        tower = model.get_vision_tower()
        geometry = dict(image_grid_pinpoints=model.config.image_grid_pinpoints, crop_size=tower.image_size,
                        patches_per_side=tower.num_patches_per_side, mm_patch_merge_type="spatial_unpad")  # fmt: skip
        assert n_features < num_image_tokens(image.size, image_aspect_ratio="anyres", **geometry)
    diff = (inputs["pixel_values"] - _native_pixels(pixels)).abs()
    # same resize, pad colour (int(mean * 255) = (122, 116, 104) for pad), black anyres pad, crops and base
    assert diff.max().item() == 0

    # the model: same logits and greedy tokens on the same pixel values
    native_kwargs = dict(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=_native_pixels(pixels),
    )
    if kind != "llava":
        native_kwargs["image_sizes"] = torch.tensor([[h, w] for w, h in sizes])  # native: (h, w)
    with torch.no_grad():
        want = model(input_ids=ids, images=pixels, image_sizes=sizes).logits  # [1, T, V]
        got = native(**native_kwargs).logits  # [1, T, V + 1]
    vocab = want.shape[-1]
    max_diff = (got[..., :vocab] - want).abs().max().item()
    assert max_diff <= LOGITS_ATOL
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ours_tokens = model.generate(inputs=ids, images=pixels, image_sizes=sizes, **gen)
    native_tokens = native.generate(**native_kwargs, **gen)[:, inputs["input_ids"].shape[1] :]
    assert native_tokens.tolist() == ours_tokens.tolist()

    # and back: the native dir imported into our class gives our logits (plus the <image> column)
    back = import_hf(tmp_path)
    assert type(back) is type(model)  # the native text config's family comes back
    assert back.config.image_aspect_ratio == model.config.image_aspect_ratio
    assert back.config.mm_unpad_rounding == "round"  # transformers' unpad
    if kind != "llava":
        side = model.get_vision_tower().image_size
        grid = [parse_grid_pinpoints(c.image_grid_pinpoints, side) for c in (back.config, model.config)]
        assert grid[0] == grid[1]
    with torch.no_grad():
        again = back(input_ids=ids, images=pixels, image_sizes=sizes).logits
    assert (again[..., :vocab] - want).abs().max().item() <= LOGITS_ATOL


def test_import_native_checkpoint_same_logits(tmp_path):
    """A checkpoint made by transformers itself (random LlavaNext, feature layer -1, GQA) -> ours."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=101)  # fmt: skip
    pinpoints_hw = [[28, 56], [56, 28], [56, 56]]  # (height, width)
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=100, image_grid_pinpoints=pinpoints_hw,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    native = LlavaNextForConditionalGeneration(config).eval()
    native.save_pretrained(tmp_path)
    ours = import_hf(tmp_path)
    assert ours.config.image_grid_pinpoints == [[56, 28], [28, 56], [56, 56]]  # (width, height)
    assert (ours.config.mm_vision_select_feature, ours.config.mm_vision_select_layer) == ("patch", -1)

    width, height = 50, 20  # wide: a 2 x 1 grid of 28px crops
    pixels = torch.randn(1, 3, 3, 28, 28)  # [n, 1 + crops, 3, S, S]
    with torch.no_grad():
        features = ours.image_features([pixels[0]], [(width, height)])[0]  # [L, h]
    n = features.shape[0]
    prompt = [1, 5, 6]
    native_ids = torch.tensor([prompt + [100] * n + [7, 8]])
    with torch.no_grad():
        want = native(
            input_ids=native_ids, pixel_values=pixels, image_sizes=torch.tensor([[height, width]])
        ).logits
        got = ours(input_ids=torch.tensor([prompt + [IMAGE_TOKEN_INDEX, 7, 8]]), images=[pixels[0]],
                   image_sizes=[(width, height)]).logits  # fmt: skip
    assert (got - want).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (dict(mm_projector_type="linear"), "mm_projector_type='linear'"),
        (dict(mm_projector_type="mlp3x_gelu"), "only 'mlp2x_gelu' maps"),
        (dict(mm_patch_merge_type="spatial"), "mm_patch_merge_type='spatial'"),
        (
            dict(image_aspect_ratio="anyres_max_4", mm_patch_merge_type="flat"),
            "image_aspect_ratio='anyres_max_4'",
        ),
    ],
)
def test_export_refuses_unmappable_models(overrides, reason):
    config = build_llava_config(ModelConfig(preset="tiny", **overrides))
    with pytest.raises(ValueError, match=re.escape(reason)):
        native_kind(config)


@pytest.mark.parametrize(
    "preset", ["llava-v1.6-vicuna-7b", "llava-v1.6-mistral-7b", "llava-onevision-qwen2-7b"]
)
def test_released_presets_unpad_with_floor_and_export_only_with_the_switch(preset):
    config = build_llava_config(ModelConfig(preset=preset))
    assert config.mm_unpad_rounding == "floor"
    with pytest.raises(ValueError, match=r"mm_unpad_rounding='floor'.*accept_native_rounding=True"):
        check_native_rounding(config)
    check_native_rounding(config, accept_native_rounding=True)


def test_floor_unpad_model_is_refused_before_anything_is_written(tokenizer, tmp_path, caplog):
    """The native classes round: a floor model exports only with accept_native_rounding, and says so; a flat
    merge has no unpad and exports as it is."""
    model = _model(tokenizer, 0, mm_unpad_rounding="floor")
    out = tmp_path / "native"
    with pytest.raises(ValueError, match="accept_native_rounding=True"):
        export_hf(model, tokenizer, out, template=TEMPLATE)
    assert not out.exists()
    with pytest.raises(ValueError, match="accept_native_rounding=True"):
        to_native_model(model, image_token_index=len(tokenizer))
    with caplog.at_level("WARNING", logger="llava_train.export.hf_native"):
        native = to_native_model(model, image_token_index=len(tokenizer), accept_native_rounding=True)
    assert native.config.model_type == "llava_next"
    assert "native model rounds instead" in caplog.text
    flat = _model(tokenizer, 0, mm_unpad_rounding="floor", **FLAT)
    assert to_native_model(flat, image_token_index=len(tokenizer)).config.model_type == "llava"


def test_released_onevision_shape_exports_as_llava_hf_lays_it_out():
    """llava-onevision-qwen2-7b on the meta device -> the llava-hf config, every weight placed, same count."""
    from transformers import LlavaOnevisionConfig

    from llava_train.export.hf_native import native_config

    with torch.device("meta"):
        model = build_model(ModelConfig(preset="llava-onevision-qwen2-7b"))
        # <image> after Qwen2's 151646 tokens; the preset unpads with the original's floor, the native rounds
        native = to_native_model(model, image_token_index=151646, accept_native_rounding=True)
    config = native_config(model, 151646)
    assert (config.model_type, config.vision_aspect_ratio) == ("llava_onevision", "anyres_max_9")
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-1, "full")
    vision = config.vision_config
    assert (vision.model_type, vision.num_hidden_layers, vision.vision_use_head) == (
        "siglip_vision_model",
        26,
        False,
    )
    assert (vision.image_size, vision.patch_size, vision.hidden_size) == (384, 14, 1152)
    released_wh = [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]  # the lmms-lab config
    assert config.image_grid_pinpoints == [[w, h] for h, w in released_wh]  # (h, w), same order
    assert sorted(config.image_grid_pinpoints) == sorted(LlavaOnevisionConfig().image_grid_pinpoints)
    assert (config.text_config.model_type, config.text_config.vocab_size) == ("qwen2", 152064)
    assert config.image_token_index == 151646
    assert sum(p.numel() for p in native.parameters()) == 8_030_348_832  # as ours: no rows added
