"""The vectorised multimodal merge equals the loop reference (tests/reference_merge.py) on random batches."""

from __future__ import annotations

import random

import pytest
import torch
from reference_merge import reference_merge

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.model import ModelConfig, build_model
from llava_train.model.anyres import get_anyres_image_grid_shape

CASES = [
    # (image_aspect_ratio, mm_patch_merge_type, image form)
    ("pad", "flat", "stack"),
    ("pad", "spatial_unpad", "stack"),
    ("pad", "spatial_unpad", "single"),
    ("anyres", "flat", "anyres"),
    ("anyres", "spatial", "anyres"),
    ("anyres", "spatial_unpad", "anyres"),
    ("anyres_max_1", "spatial_unpad", "anyres"),
    ("anyres_max_2", "spatial_unpad", "anyres"),
]
BATCHES_PER_CASE = 12


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", hidden_size=64, intermediate_size=128)).eval()


def _image(rng: random.Random, model, form: str) -> tuple[torch.Tensor, tuple[int, int]]:
    size = (rng.randint(20, 400), rng.randint(20, 400))
    side = model.get_vision_tower().image_size
    if form == "anyres":
        num_w, num_h = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, side)
        return torch.randn(1 + num_w * num_h, 3, side, side), size
    if form == "single":
        return torch.randn(1, 3, side, side), size
    return torch.randn(3, side, side), size


def _row_tokens(rng: random.Random, num_images: int) -> list[int]:
    tokens = [1]
    for _ in range(num_images):
        tokens += [rng.randint(3, 500) for _ in range(rng.randint(0, 4))] + [IMAGE_TOKEN_INDEX]
    return tokens + [rng.randint(3, 500) for _ in range(rng.randint(1, 6))]


def random_batch(rng: random.Random, model, form: str) -> dict:
    """Rows with 0/1/2 images, random padding (side and amount), labels, optional dummies."""
    rows, images, sizes = [], [], []
    use_dummies = rng.random() < 0.3
    for _ in range(rng.randint(1, 4)):
        num_images = rng.choice([0, 0, 1, 1, 2])
        rows.append(_row_tokens(rng, num_images))
        for _ in range(num_images or int(use_dummies)):
            image, size = _image(rng, model, form)
            images.append(image)
            sizes.append(size)
    width = max(len(r) for r in rows) + rng.randint(0, 3)
    left = rng.random() < 0.5
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, cols] = torch.tensor(row)
        mask[i, cols] = True
    labels = ids.masked_fill(~mask | (ids == IMAGE_TOKEN_INDEX) | (torch.rand(ids.shape) < 0.3), IGNORE_INDEX)
    if not images:
        stacked = None
    elif form == "stack":
        stacked = torch.stack(images)
    else:
        stacked = images
    return dict(
        input_ids=ids,
        position_ids=torch.arange(width)[None].expand(len(rows), -1) if rng.random() < 0.5 else None,
        attention_mask=(mask.long() if rng.random() < 0.5 else mask) if rng.random() < 0.8 or left else None,
        labels=labels if rng.random() < 0.8 else None,
        images=stacked,
        image_sizes=sizes,
    )


def _assert_same(got: tuple, want: tuple) -> None:
    names = ["input_ids", "position_ids", "attention_mask", "past_key_values", "inputs_embeds", "labels"]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("aspect,merge,form", CASES)
def test_vectorised_merge_matches_reference(model, aspect, merge, form):
    rng = random.Random(f"{aspect}-{merge}-{form}")
    torch.manual_seed(rng.randint(0, 10**6))
    model.config.image_aspect_ratio = aspect
    model.config.mm_patch_merge_type = merge
    checked = 0
    for _ in range(BATCHES_PER_CASE):
        batch = random_batch(rng, model, form)
        if batch["images"] is None:
            continue
        model.config.tokenizer_padding_side = rng.choice(["left", "right"])
        model.config.tokenizer_model_max_length = rng.choice([None, rng.randint(4, 60)])
        with torch.no_grad():
            got = model.prepare_inputs_labels_for_multimodal(**{**batch, "past_key_values": None})
            want = reference_merge(model, **batch)
        _assert_same(got, want)
        checked += 1
    assert checked >= BATCHES_PER_CASE // 2


def test_placeholder_count_mismatch_names_row(model):
    model.config.image_aspect_ratio, model.config.mm_patch_merge_type = "pad", "flat"
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5], [1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]])
    images = torch.randn(2, 3, 56, 56)
    with pytest.raises(ValueError, match="row 1"):
        model.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, None)
    with pytest.raises(ValueError, match="4 images for 3"):
        model.prepare_inputs_labels_for_multimodal(
            ids, None, None, None, None, torch.randn(4, 3, 56, 56), None
        )


def test_decode_step_passes_through(model):
    ids = torch.tensor([[7], [8]])
    out = model.prepare_inputs_labels_for_multimodal(
        ids, None, None, "cache", None, torch.randn(2, 3, 56, 56)
    )
    assert out[0] is ids and out[3] == "cache" and out[4] is None


def test_every_multimodal_module_runs_without_images(model):
    model.config.image_aspect_ratio, model.config.mm_patch_merge_type = "anyres", "spatial_unpad"
    model.train()
    model.zero_grad()
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
    loss.backward()
    model.eval()
    # DDP needs every trainable parameter an image batch uses in the graph (a tuned tower's too); ZeRO-3 the
    # same gathers on every rank. The tower's parameters all require grad in this fixture.
    mm = [(n, p) for n, p in model.named_parameters() if "vision_tower" in n or "mm_projector" in n]
    without_images = {n for n, p in mm if p.grad is not None}
    assert all(not p.grad.any() for n, p in mm if n in without_images)
    model.train()
    model.zero_grad(set_to_none=True)
    image = [torch.randn(3, 3, 56, 56)]  # base + a 2x1 grid
    model(
        input_ids=torch.tensor([[1, IMAGE_TOKEN_INDEX, 6]]), images=image, image_sizes=[(112, 56)]
    ).logits.sum().backward()
    model.eval()
    with_images = {n for n, p in mm if p.grad is not None}
    assert any("vision_tower" in n for n in with_images) and without_images == with_images
    assert model.get_model().image_newline.grad is not None
    # The anchor is exactly zero: same loss as the plain LLM path.
    with torch.no_grad():
        plain = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss.detach(), plain)


def _grad_ready_order(model, **inputs) -> list[str]:
    """The trainable parameters in the order backward makes their gradients ready (ZeRO-2 fills its
    reduction buckets in this order, so ranks must agree on it)."""
    order: list[str] = []
    hooks = [
        p.register_post_accumulate_grad_hook(lambda _, n=n: order.append(n))
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    model.train()
    model.zero_grad(set_to_none=True)
    model(**inputs).loss.backward()
    model.eval()
    for h in hooks:
        h.remove()
    return order


def test_gradients_are_ready_in_the_same_order_with_and_without_images(model):
    model.config.image_aspect_ratio, model.config.mm_patch_merge_type = "anyres", "spatial_unpad"
    text = torch.tensor([[1, 5, 6, 7]])
    with_image = torch.tensor([[1, IMAGE_TOKEN_INDEX, 6, 7]])
    image = dict(images=[torch.randn(3, 3, 56, 56)], image_sizes=[(112, 56)])
    for ids, extra in ((text, {}), (with_image, image)):
        order = _grad_ready_order(model, input_ids=ids, labels=ids.clamp(min=0), **extra)
        if not extra:
            without = order
    assert set(without) == set(order)
    embed = next(n for n in order if "embed_tokens" in n)
    mm = [n for n in order if "mm_projector" in n or "vision_tower" in n or "image_newline" in n]
    assert all(without.index(embed) < without.index(n) for n in mm), without
    assert all(order.index(embed) < order.index(n) for n in mm), order
