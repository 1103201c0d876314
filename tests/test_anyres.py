"""Anyres geometry and feature counts agree with transformers' LlavaNext / LlavaOnevision.

transformers uses (height, width) for image sizes and pinpoints; we use (width, height). Every
comparison passes the swapped pairs in the same order.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llava_next import modeling_llava_next as hf_next
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from llava_train.model import ModelConfig, build_model
from llava_train.model.anyres import (
    get_anyres_image_grid_shape,
    num_image_tokens,
    parse_grid_pinpoints,
    select_best_resolution,
    unpad_image,
    unpadded_shape,
)

V16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
PINPOINT_SETS = [(V16, 336, 14), (TINY, 56, 14), ("(1x1),...,(3x3)", 336, 14)]


def _sizes(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    fixed = [(1, 1), (336, 336), (672, 336), (336, 672), (1000, 3), (3, 1000), (504, 336), (2000, 1999)]
    return fixed + [(rng.randint(1, 2000), rng.randint(1, 2000)) for _ in range(count)]


def _hf_features(processor_cls, pinpoints_hw, size, crop, patch, aspect=None) -> int:
    """transformers' processor feature count for one (w, h) image, without CLS tokens."""
    fake = SimpleNamespace(
        image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints_hw),
        patch_size=patch,
        num_additional_image_tokens=0,
        num_image_tokens=(crop // patch) ** 2,
        vision_aspect_ratio=aspect,
    )
    fake._get_unpadded_features = lambda *a: processor_cls._get_unpadded_features(fake, *a)
    width, height = size
    return processor_cls._get_number_of_features(fake, height, width, crop, crop)


@pytest.mark.parametrize("pinpoints,crop,patch", PINPOINT_SETS)
def test_geometry_matches_transformers(pinpoints, crop, patch):
    ours = parse_grid_pinpoints(pinpoints, crop)
    hf = [[h, w] for w, h in ours]
    side = crop // patch
    for w, h in _sizes(0, 300):
        best_w, best_h = select_best_resolution((w, h), ours)
        assert hf_next.select_best_resolution((h, w), hf) == (best_h, best_w)
        num_w, num_h = get_anyres_image_grid_shape((w, h), pinpoints, crop)
        assert hf_next.get_anyres_image_grid_shape((h, w), hf, crop) == (num_h, num_w)
        assert hf_next.image_size_to_num_patches((h, w), hf, crop) == 1 + num_w * num_h
        fmap = torch.arange(num_h * side * num_w * side, dtype=torch.float32).view(
            1, num_h * side, num_w * side
        )
        torch.testing.assert_close(unpad_image(fmap, (w, h)), hf_next.unpad_image(fmap, (h, w)))


@pytest.mark.parametrize("pinpoints,crop,patch", PINPOINT_SETS)
def test_feature_count_matches_transformers(pinpoints, crop, patch):
    hf = [[h, w] for w, h in parse_grid_pinpoints(pinpoints, crop)]
    common = dict(mm_patch_merge_type="spatial_unpad", image_grid_pinpoints=pinpoints, crop_size=crop)
    for size in _sizes(1, 200):
        ours = num_image_tokens(size, image_aspect_ratio="anyres", patches_per_side=crop // patch, **common)
        assert ours == _hf_features(LlavaNextProcessor, hf, size, crop, patch), size
        for n in (1, 4, 9):
            aspect = f"anyres_max_{n}"
            ours = num_image_tokens(size, image_aspect_ratio=aspect, patches_per_side=crop // patch, **common)
            assert ours == _hf_features(LlavaOnevisionProcessor, hf, size, crop, patch, aspect), (size, n)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64)).eval()


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1", "anyres_max_2"])
@pytest.mark.parametrize("merge", ["flat", "spatial", "spatial_unpad"])
def test_model_feature_length_matches_num_image_tokens(tiny_model, aspect, merge):
    model = tiny_model
    model.config.image_aspect_ratio, model.config.mm_patch_merge_type = aspect, merge
    sizes = _sizes(2, 12)
    with torch.no_grad():
        features = model.image_features(_anyres_crops(model, sizes), sizes)
    for size, feature, expected in zip(sizes, features, _data_side_counts(model, sizes)):
        assert feature.shape == (expected, model.config.hidden_size), size


def _anyres_crops(model, sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Random pixels shaped as the model's anyres crops of each size: [1 + grid crops, 3, S, S]."""
    side = model.get_vision_tower().image_size
    grids = [get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, side) for size in sizes]
    return [torch.randn(1 + w * h, 3, side, side) for w, h in grids]


def _data_side_counts(model, sizes: list[tuple[int, int]]) -> list[int]:
    """Image tokens per size as the dataset counts them (VisionSpec read from the built model)."""
    from llava_train.data.config import VisionSpec

    spec = VisionSpec.from_model(model)
    return [spec.image_tokens(size) for size in sizes]


@pytest.mark.parametrize("aspect", ["pad", "anyres"])
def test_cls_patch_features_count_the_cls_token(aspect):
    """select_feature cls_patch keeps CLS: P*P + 1 per crop, and the data side counts it (VisionSpec)."""
    from llava_train.data.config import VisionSpec

    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="tiny", hidden_size=32, intermediate_size=64, mm_vision_select_feature="cls_patch",
        mm_patch_merge_type="flat", image_aspect_ratio=aspect,
    )  # fmt: skip
    model = build_model(cfg).eval()
    spec = VisionSpec.from_model(model)
    assert spec.cls_token
    sizes = _sizes(2, 6)
    side = spec.crop_size
    images = torch.randn(len(sizes), 3, side, side) if aspect == "pad" else _anyres_crops(model, sizes)
    with torch.no_grad():
        features = model.image_features(images, sizes)
    for size, feature, expected in zip(sizes, features, _data_side_counts(model, sizes)):
        assert feature.shape[0] == expected, size


def test_cls_patch_with_a_spatial_merge_is_refused():
    cfg = ModelConfig(
        preset="tiny", mm_vision_select_feature="cls_patch", mm_patch_merge_type="spatial_unpad"
    )
    with pytest.raises(ValueError, match="cls_patch with mm_patch_merge_type=spatial_unpad"):
        build_model(cfg)
    with pytest.raises(ValueError, match="cls_patch has no spatial_unpad merge"):
        num_image_tokens(
            (60, 40), image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
            image_grid_pinpoints=[[56, 56]], crop_size=56, patches_per_side=4, cls_token=True,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# mm_unpad_rounding: floor (the original LLaVA / LLaVA-NeXT) vs round (transformers)
# ----------------------------------------------------------------------------------------------


def _original_unpad(fmap: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
    """The original's unpad arithmetic, restated: int() of the scaled side, then the symmetric padding."""
    original_width, original_height = original_size
    current_height, current_width = fmap.shape[-2:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return fmap[..., padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return fmap[..., padding : current_width - padding]


def _rounding_sweep(pinpoints, crop: int, side: int, sides: range):
    """Every (w, h) in sides x sides with its grid's feature map [1, H, W]; and those where floor != round."""
    canvases = parse_grid_pinpoints(pinpoints, crop)
    maps, sizes, differ = {}, [], []
    for w in sides:
        for h in sides:
            best_w, best_h = select_best_resolution((w, h), canvases)
            shape = (best_h // crop * side, best_w // crop * side)
            if shape not in maps:
                maps[shape] = torch.arange(shape[0] * shape[1]).view(1, *shape)
            sizes.append(((w, h), maps[shape]))
            if unpadded_shape(*shape, (w, h), "floor") != unpadded_shape(*shape, (w, h), "round"):
                differ.append((w, h))
    return sizes, differ


# (pinpoints, crop, patches per side, sizes where floor and round differ in the sweep over 1..199 squared)
ROUNDING_GEOMETRIES = {
    "tiny": (TINY, 56, 4, [(47, 188), (188, 47)]),
    "v16": (V16, 336, 24, [(55, 176), (88, 55), (88, 99), (176, 110), (176, 198)]),
}


@pytest.mark.parametrize("geometry", sorted(ROUNDING_GEOMETRIES))
def test_floor_unpad_is_the_originals_arithmetic(geometry):
    """floor = the original's int() on every size of the sweep; where it differs from round (float error in
    the scaled side), round is transformers' and floor keeps two rows or columns fewer."""
    pinpoints, crop, side, expected = ROUNDING_GEOMETRIES[geometry]
    sizes, differ = _rounding_sweep(pinpoints, crop, side, range(1, 200))
    assert differ == expected
    for size, fmap in sizes:
        assert torch.equal(unpad_image(fmap, size, "floor"), _original_unpad(fmap, size)), size
    for w, h in differ:
        fmap = dict(sizes)[(w, h)]
        floor, rounded = unpad_image(fmap, (w, h), "floor"), unpad_image(fmap, (w, h), "round")
        assert torch.equal(rounded, hf_next.unpad_image(fmap, (h, w)))
        assert sorted([a - b for a, b in zip(rounded.shape, floor.shape)]) == [0, 0, 2]
    with pytest.raises(ValueError, match="mm_unpad_rounding='Floor'; use 'round'"):
        unpadded_shape(8, 8, (49, 49), "Floor")


ROUNDING_SIZES = [(47, 188), (343, 392), (90, 50)]  # unpadded maps (tiny): floor 12x2, 6x8; round 12x4, 8x8


# whether the token counts differ per size: anyres_max_1 downscales both of (47, 188)'s maps to 34 tokens
@pytest.mark.parametrize(
    "aspect,differs", [("anyres", [True, True, False]), ("anyres_max_1", [False, True, False])]
)
def test_model_features_follow_mm_unpad_rounding(tiny_model, monkeypatch, aspect, differs):
    """Both settings: the merged length is what the data side counts (VisionSpec); floor's tokens are the
    original's unpad of the grid's feature map (read from the plain spatial merge), then the newline."""
    model = tiny_model
    monkeypatch.setattr(model.config, "image_aspect_ratio", aspect)
    monkeypatch.setattr(model.config, "mm_patch_merge_type", "spatial_unpad")
    torch.manual_seed(0)
    crops = _anyres_crops(model, ROUNDING_SIZES)
    lengths = {}
    for rounding in ("round", "floor"):
        monkeypatch.setattr(model.config, "mm_unpad_rounding", rounding)
        with torch.no_grad():
            features = model.image_features(crops, ROUNDING_SIZES)
        counts = _data_side_counts(model, ROUNDING_SIZES)
        assert [f.shape[0] for f in features] == counts
        lengths[rounding] = counts
    assert [a != b for a, b in zip(lengths["round"], lengths["floor"])] == differs
    if aspect != "anyres":
        return  # anyres_max_N resizes the map bilinearly: the rows kept are checked through the count
    monkeypatch.setattr(model.config, "mm_patch_merge_type", "spatial")
    with torch.no_grad():
        grids = model.image_features(crops, ROUNDING_SIZES)  # base crop, then the whole grid's map
    newline = model.get_model().image_newline
    pp = model.get_vision_tower().num_patches_per_side ** 2
    side = model.get_vision_tower().image_size
    for size, grid, got in zip(ROUNDING_SIZES, grids, features):
        num_w, num_h = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, side)
        p = math.isqrt(pp)
        fmap = grid[pp:].view(num_h * p, num_w * p, -1).permute(2, 0, 1)  # [h, H, W]
        kept = _original_unpad(fmap, size)  # [h, H', W']
        kept = torch.cat([kept, newline[:, None, None].expand(-1, kept.shape[1], 1)], dim=-1)  # [h, H', W'+1]
        want = torch.cat([grid[:pp], kept.flatten(1).T])  # [P*P + H'*(W'+1), h]
        torch.testing.assert_close(got, want, rtol=0, atol=0)
