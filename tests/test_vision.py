"""Vision tower: feature selection, properties, and the native multiscale (S2) forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llava_train.model import CLIPVisionTower, CLIPVisionTowerS2, build_vision_tower

TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14)  # fmt: skip


def _args(**kw):
    return SimpleNamespace(
        mm_vision_tower="tiny-clip", mm_vision_config=TINY_CLIP, mm_vision_select_layer=-2, **kw
    )


def test_select_feature_patch_vs_cls_patch():
    torch.manual_seed(0)
    patch = build_vision_tower(_args(mm_vision_select_feature="patch"))
    cls_patch = CLIPVisionTower("tiny-clip", _args(mm_vision_select_feature="cls_patch"))
    cls_patch.load_state_dict(patch.state_dict())
    images = torch.randn(3, 3, 28, 28)
    a, b = patch(images), cls_patch(images)
    assert a.shape == (3, 4, 32) and b.shape == (3, 5, 32)
    torch.testing.assert_close(b[:, 1:], a)
    assert (patch.hidden_size, patch.num_patches_per_side, patch.num_patches, patch.image_size) == (
        32,
        2,
        4,
        28,
    )
    assert isinstance(patch.vision_tower, torch.nn.Module) and patch.dtype == torch.float32
    with pytest.raises(ValueError, match="cls_patch"):
        build_vision_tower(_args(mm_vision_select_feature="cls"))


def test_tower_is_trainable_when_unfrozen():
    tower = build_vision_tower(_args())
    tower(torch.randn(1, 3, 28, 28)).sum().backward()
    assert tower.vision_tower.embeddings.patch_embedding.weight.grad is not None


def test_s2_output_shape_and_first_scale():
    torch.manual_seed(0)
    s2 = build_vision_tower(_args(use_s2=True, s2_scales="28,56,84"))
    assert isinstance(s2, CLIPVisionTowerS2)
    assert s2.hidden_size == 96 and s2.image_size == 84 and s2.num_patches_per_side == 2
    images = torch.randn(2, 3, 84, 84)
    out = s2(images)
    assert out.shape == (2, 4, 96)
    # The first scale is the plain tower on the image resized to the base size.
    base = torch.nn.functional.interpolate(images, size=(28, 28), mode="bicubic")
    torch.testing.assert_close(out[..., :32], s2.forward_feature(base))
    with pytest.raises(ValueError, match="multiples"):
        build_vision_tower(_args(use_s2=True, s2_scales="28,42"))


def test_s2_stitches_crops_in_place():
    """At scale 2x, each quarter of the image lands in the matching quarter of the pooled grid."""
    torch.manual_seed(0)
    s2 = build_vision_tower(_args(use_s2=True, s2_scales="28,56"))
    images = torch.randn(1, 3, 56, 56)
    feats = s2._forward_scale(images, 56)  # [1, 4, 32] on a 2x2 grid
    crops = s2.forward_feature(torch.cat([images[..., :28, :28], images[..., :28, 28:]]))  # [2, 4, 32]
    torch.testing.assert_close(feats[0, 0], crops[0].mean(0))  # top-left crop pooled
    torch.testing.assert_close(feats[0, 1], crops[1].mean(0))  # top-right crop pooled
