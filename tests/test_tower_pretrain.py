"""Vision tower pretraining (the demo's stand-in for CLIP): augmentation, training, input checks."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from llava_train.data.image import build_image_processor
from llava_train.model.vision_tower import CLIPVisionTower
from llava_train.train.tower_pretrain import (
    TowerPretrainConfig,
    _accuracy,
    _loss,
    augment,
    load_caption_pairs,
    pretrain_vision_tower,
)

SIDE = 28


def tiny_tower(select_layer: int = -1) -> CLIPVisionTower:
    torch.manual_seed(0)
    config = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=SIDE, patch_size=14, projection_dim=32,
    )  # fmt: skip
    args = SimpleNamespace(
        mm_vision_config=config, mm_vision_select_layer=select_layer, mm_vision_select_feature="patch"
    )
    return CLIPVisionTower("tiny-test-tower", args)


def bars(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Two classes of noisy images: a bright horizontal or vertical bar."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, SIDE, SIDE, generator=g) * 0.1 - 1.0
    captions = []
    for i in range(n):
        if i % 2 == 0:
            pixels[i, :, 11:17, 3:25] += 2.0
            captions.append("a horizontal bar")
        else:
            pixels[i, :, 3:25, 11:17] += 2.0
            captions.append("a vertical bar")
    return pixels, captions


def test_augment_identity_when_all_ranges_are_zero():
    pixels = torch.randn(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    cfg = TowerPretrainConfig(max_rotate=0.0, max_scale=0.0, max_shift=0.0)
    out = augment(pixels, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, pixels, atol=1e-4, rtol=0)  # bilinear at pixel centres: float error only


def test_augment_differs_per_image_and_keeps_shape():
    one = torch.randn(1, 3, SIDE, SIDE)
    pixels = one.repeat(3, 1, 1, 1)
    out = augment(pixels, TowerPretrainConfig(), torch.Generator().manual_seed(0))
    assert out.shape == pixels.shape
    assert not torch.allclose(out[0], pixels[0])
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_pretraining_learns_the_captions_and_reports_held_back_accuracy():
    tower = tiny_tower()
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    pixels, captions = bars(64)
    cfg = TowerPretrainConfig(
        epochs=15, batch_size=8, lr=3e-3, max_rotate=0.05, max_shift=0.05, val_share=0.25
    )
    report = pretrain_vision_tower(tower, pixels, captions, cfg)
    assert report["classes"] == ["a horizontal bar", "a vertical bar"]
    assert (report["n_train"], report["n_val"]) == (48, 16)
    assert report["loss"][-1] < report["loss"][0] * 0.5
    assert report["train_accuracy"] == 1.0
    assert report["val_accuracy"] >= 0.9  # pairs it never trained on
    assert any(not torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_frozen_tower_parameters_stay_put():
    tower = tiny_tower()
    embed = (
        tower.vision_tower.vision_model.embeddings if hasattr(tower.vision_tower, "vision_model") else None
    )
    module = embed if embed is not None else tower.vision_tower.embeddings
    module.requires_grad_(False)
    frozen = {k: v.clone() for k, v in module.state_dict().items()}
    pixels, captions = bars(16)
    pretrain_vision_tower(tower, pixels, captions, TowerPretrainConfig(epochs=2, batch_size=8, val_share=0.0))
    for k, v in module.state_dict().items():
        assert torch.equal(frozen[k], v), k


@pytest.mark.parametrize("epochs,warmup_ratio", [(1, 0.05), (2, 1.0)])
def test_warmup_covering_every_step_trains(epochs, warmup_ratio):
    """One batch per epoch: warmup is every step (the cosine part had a division by zero)."""
    pixels, captions = bars(8)
    cfg = TowerPretrainConfig(epochs=epochs, batch_size=8, val_share=0.0, warmup_ratio=warmup_ratio)
    report = pretrain_vision_tower(tiny_tower(), pixels, captions, cfg)
    assert len(report["loss"]) == epochs


@pytest.mark.parametrize(
    ("captions", "match"),
    [(["a", "b"], "3 images but 2 captions"), (["a", "a", "a"], "at least 2 distinct captions")],
)
def test_bad_inputs_are_refused(captions, match):
    with pytest.raises(ValueError, match=match):
        pretrain_vision_tower(tiny_tower(), torch.zeros(3, 3, SIDE, SIDE), captions, TowerPretrainConfig())


def test_load_caption_pairs_processes_images_and_rejects_escapes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, value in (("a.png", 0), ("b.png", 255)):
        Image.new("RGB", (40, 30), (value,) * 3).save(folder / name)
    pairs = tmp_path / "pairs.json"
    pairs.write_text(
        json.dumps([{"image": "a.png", "caption": "dark"}, {"image": "b.png", "caption": "light"}])
    )
    pixels, captions = load_caption_pairs(pairs, folder, build_image_processor(SIDE))
    assert pixels.shape == (2, 3, SIDE, SIDE) and captions == ["dark", "light"]
    assert pixels[0].mean() < 0 < pixels[1].mean()  # normalised with the CLIP mean / std

    (tmp_path / "outside.png").write_bytes((folder / "a.png").read_bytes())
    pairs.write_text(json.dumps([{"image": "../outside.png", "caption": "x"}]))
    with pytest.raises(ValueError, match=r"record 0 .*path_escapes_root|record 0 .*outside"):
        load_caption_pairs(pairs, folder, build_image_processor(SIDE))
    pairs.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="record 0 needs non-empty 'image' and 'caption'"):
        load_caption_pairs(pairs, folder, build_image_processor(SIDE))


def test_token_loss_adds_the_classification_of_every_token_alone():
    tower = tiny_tower()
    head = torch.nn.Linear(32, 2)
    pixels, captions = bars(6)
    labels = torch.tensor([0, 1] * 3)
    tokens = tower(pixels)  # [6, 4, 32]
    mean_ce = torch.nn.functional.cross_entropy(head(tokens.mean(1)), labels)
    per_token = [
        torch.nn.functional.cross_entropy(head(tokens[:, t]), labels) for t in range(tokens.shape[1])
    ]
    expected = mean_ce + 0.5 * torch.stack(per_token).mean()
    torch.testing.assert_close(_loss(tower, head, pixels, labels, 0.0), mean_ce)
    torch.testing.assert_close(_loss(tower, head, pixels, labels, 0.5), expected)


def test_accuracy_pooled_and_per_token_by_hand():
    # 2 images x 3 tokens, 2 classes; an identity head reads class scores straight from the features
    tokens = torch.tensor(
        [[[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]],  # mean (0.67, 1.0) -> class 1; tokens 0, 0, 1
         [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]]  # mean -> class 1; tokens 1, 1, 1
    )  # fmt: skip
    tower = torch.nn.Module()
    tower.forward = lambda pixels: tokens[: len(pixels)]
    head = torch.nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
        head.bias.zero_()
    pooled, token = _accuracy(tower, head, torch.zeros(2, 3, SIDE, SIDE), torch.tensor([0, 1]))
    assert pooled == 0.5  # image 0 pools to class 1 (wrong), image 1 to class 1 (right)
    assert token == pytest.approx((2 / 3 + 1.0) / 2)  # image 0: 2 of 3 tokens say 0; image 1: all say 1
    assert tower.training  # the train / eval mode is restored
