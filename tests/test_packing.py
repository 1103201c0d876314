"""Packing (llava_train/data/packing.py + the model's seq_ids path) equals the unpacked computation.

A packed row must give the same loss and gradients as its samples padded one per row (loss normalised
by supervised tokens), with images (pad and anyres), restart position ids per sample, and never let a
token see another sample.
"""

from __future__ import annotations

import random

import pytest
import torch

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.data.collator import DataCollator
from llava_train.data.packing import (
    PackedDataset,
    PackingCollator,
    build_packed_dataset,
    pack_lengths,
    padding_fraction,
)
from llava_train.data.sampler import build_sampler
from llava_train.model import ModelConfig, build_model
from llava_train.model.anyres import get_anyres_image_grid_shape, is_anyres, num_image_tokens
from llava_train.model.merge import drop_padding, packed_attention_mask, packed_position_ids

VOCAB = 500


def _model(aspect: str, merge: str, attn: str = "sdpa", preset: str = "tiny"):
    """The preset at test sizes; Mistral and Qwen2 + SigLIP with grouped-query attention (2 key / value
    heads for 4 query heads), as both families have."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset=preset,
        hidden_size=64,
        intermediate_size=128,
        num_key_value_heads=2 if preset in ("tiny_mistral", "tiny_qwen2_siglip") else None,
        image_aspect_ratio=aspect,
        mm_patch_merge_type=merge,
        attn_implementation=attn,
    )
    return build_model(cfg).eval()


def _sample(rng: random.Random, model, n_img: int, sid: str) -> dict:
    """A synthetic sample: prompt, images, supervised reply; exact length from the model's geometry."""
    side = model.get_vision_tower().image_size
    anyres = is_anyres(model.config.image_aspect_ratio)
    ids, images, sizes = [1], [], []
    for _ in range(n_img):
        ids += [rng.randint(3, VOCAB - 1) for _ in range(rng.randint(1, 4))] + [IMAGE_TOKEN_INDEX]
        size = (rng.randint(20, 170), rng.randint(20, 170))
        crops = 1
        if anyres:
            num_w, num_h = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, side)
            crops += num_w * num_h
        images.append(torch.randn(crops, 3, side, side))
        sizes.append(size)
    prompt = len(ids) + rng.randint(1, 5)
    ids += [rng.randint(3, VOCAB - 1) for _ in range(prompt - len(ids) + rng.randint(3, 12))]
    labels = torch.tensor(ids)
    labels[:prompt] = IGNORE_INDEX
    pixels = None
    if images:
        pixels = images if anyres else torch.cat(images)
    image_tokens = [
        num_image_tokens(
            size,
            image_aspect_ratio=model.config.image_aspect_ratio,
            mm_patch_merge_type=model.config.mm_patch_merge_type,
            image_grid_pinpoints=model.config.image_grid_pinpoints,
            crop_size=side,
            patches_per_side=model.get_vision_tower().num_patches_per_side,
        )
        for size in sizes
    ]
    return {
        "input_ids": torch.tensor(ids),
        "labels": labels,
        "images": pixels,
        "image_sizes": sizes,
        "sample_id": sid,
        "length": len(ids) - n_img + sum(image_tokens),  # exact, as the dataset reports it
    }


def _samples(model, n_imgs: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_sample(rng, model, n, f"s{i}") for i, n in enumerate(n_imgs)]


def _supervised(samples: list[dict]) -> int:
    return sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in samples)


def _loss_and_grads(model, batch: dict, n_items: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    batch = {k: v for k, v in batch.items() if k != "sample_ids"}
    out = model(**batch, num_items_in_batch=torch.tensor(n_items))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


CASES = [
    ("pad", "flat", "sdpa", "tiny"),
    ("pad", "flat", "eager", "tiny"),
    ("anyres", "spatial_unpad", "sdpa", "tiny"),
    ("anyres", "flat", "sdpa", "tiny"),
    # every other family; Gemma 3 mixes sliding-window (8 tokens here) and full layers
    ("anyres", "spatial_unpad", "sdpa", "tiny_mistral"),
    ("anyres", "spatial_unpad", "sdpa", "tiny_qwen3"),
    ("anyres_max_4", "spatial_unpad", "sdpa", "tiny_qwen2_siglip"),
    ("anyres", "spatial_unpad", "sdpa", "tiny_gemma3"),
    ("pad", "flat", "eager", "tiny_gemma3"),
    # sdpa_varlen (model/varlen.py): one causal sdpa per sample, windowed where Mistral / Gemma 3 slide
    ("pad", "flat", "sdpa_varlen", "tiny"),
    ("anyres", "spatial_unpad", "sdpa_varlen", "tiny"),
    ("anyres", "spatial_unpad", "sdpa_varlen", "tiny_mistral"),
    ("anyres_max_4", "spatial_unpad", "sdpa_varlen", "tiny_qwen2_siglip"),
    ("anyres", "spatial_unpad", "sdpa_varlen", "tiny_gemma3"),
]


@pytest.mark.parametrize("aspect,merge,attn,preset", CASES)
def test_packed_loss_and_grads_equal_unpacked(aspect, merge, attn, preset):
    model = _model(aspect, merge, attn, preset)
    if preset == "tiny_mistral":  # its preset has no window: slide over 8 tokens, as Gemma 3's local layers
        model.config.sliding_window = 8
    samples = _samples(model, [1, 0, 2, 1, 0])
    n = _supervised(samples)
    for s in samples:  # unpacked: token 0's label is never a target either
        s["labels"][0] = IGNORE_INDEX
    loss_ref, grads_ref = _loss_and_grads(model, DataCollator(0)(samples), n)
    packed = PackingCollator(0)([samples[:3], samples[3:]])
    assert packed["seq_ids"].shape == packed["input_ids"].shape
    assert packed["seq_ids"][0].unique().tolist() == [1, 2, 3]
    seen = []
    hook = model.get_model().register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True
    )
    loss, grads = _loss_and_grads(model, packed, n)
    hook.remove()
    # the exact lengths packing relies on are the merged lengths; varlen: the rows end to end, no padding
    lengths = [sum(s["length"] for s in samples[:3]), sum(s["length"] for s in samples[3:])]
    assert seen == [(1, sum(lengths)) if attn == "sdpa_varlen" else (2, max(lengths))]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("aspect,merge", [("pad", "flat"), ("anyres", "spatial_unpad")])
def test_no_attention_across_samples_and_positions_restart(aspect, merge):
    model = _model(aspect, merge)
    a, b = _samples(model, [1, 1], seed=1)
    a2 = _sample(random.Random(7), model, 1, "a2")
    a2["input_ids"] = a["input_ids"].clone()  # same length and image size, different content
    a2["input_ids"][a2["input_ids"] != IMAGE_TOKEN_INDEX] = (a["input_ids"][1:2] + 1) % VOCAB
    a2["images"], a2["image_sizes"] = (
        [x + 1 for x in a["images"]] if isinstance(a["images"], list) else a["images"] + 1,
        a["image_sizes"],
    )
    with torch.no_grad():
        len_a = model(**_strip(DataCollator(0)([a]))).logits.shape[1]
        alone = model(**_strip(DataCollator(0)([b]))).logits[0]  # [T_b, V]
        packed = model(**_strip(PackingCollator(0)([[a, b]]))).logits[0]  # [T_a + T_b, V]
        perturbed = model(**_strip(PackingCollator(0)([[a2, b]]))).logits[0]
    assert not torch.allclose(packed[:len_a], perturbed[:len_a])
    torch.testing.assert_close(packed[len_a:], perturbed[len_a:], rtol=0, atol=1e-6)
    torch.testing.assert_close(packed[len_a:], alone, rtol=1e-5, atol=1e-5)  # positions restart at 0


def _strip(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("sample_ids", "labels")}


def test_packed_position_ids_and_mask():
    seq = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert packed_position_ids(seq).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    mask = packed_attention_mask(seq, "sdpa", torch.float32)  # [2, 1, 8, 8]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0].any(-1).all()  # padding rows attend to themselves: no NaN in sdpa
    assert torch.equal(mask[1, 0], torch.ones(8, 8, dtype=torch.bool).tril())
    eager = packed_attention_mask(seq, "eager", torch.float32)
    assert torch.equal(eager == 0, mask)
    assert packed_attention_mask(seq, "flash_attention_2", torch.float32) is None


def _naive_ffd(lengths: list[int], cap: int) -> list[list[int]]:
    bins, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for k, room in enumerate(free):
            if room >= lengths[i]:
                bins[k].append(i)
                free[k] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(cap - lengths[i])
    return bins


def test_pack_lengths_is_first_fit_decreasing_and_respects_modality():
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 80), rng.randint(600, 1500)]) for _ in range(500)]
    bins = pack_lengths(lengths, 2048)
    assert bins == _naive_ffd(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    modal = [int(n > 300) for n in lengths]
    split = pack_lengths(lengths, 2048, modal)
    assert all(len({modal[i] for i in b}) == 1 for b in split)
    assert padding_fraction([[b] for b in bins], lengths) == 0.0
    with pytest.raises(ValueError, match="longer than max_length"):
        pack_lengths([10, 3000], 2048)


class _ToyDataset(torch.utils.data.Dataset):
    def __init__(self, model):
        self.samples = _samples(model, [1, 0, 1, 0, 2, 1, 0, 1], seed=3)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    @property
    def modality_lengths(self):
        return [
            len(s["input_ids"]) if s["images"] is not None else -len(s["input_ids"]) for s in self.samples
        ]


def test_packed_dataset_with_modality_sampler_and_length_check():
    model = _model("pad", "flat")
    data = _ToyDataset(model)
    packed = build_packed_dataset(data, max_length=80, by_modality=True)
    assert isinstance(packed, PackedDataset)
    assert sorted(i for p in packed.packs for i in p) == list(range(len(data)))
    order = list(build_sampler(packed, batch_size=2, seed=0, by_modality=True))
    assert set(order) == set(range(len(packed)))
    for pack in packed:
        assert len({s["images"] is None for s in pack}) == 1  # single-modality rows
    batch = PackingCollator(0, max_length=80)([packed[i] for i in order[:2]])
    assert batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="exact lengths"):
        PackingCollator(0, max_length=5)([packed[0]])


def test_position_id_packing_equals_block_mask(monkeypatch):
    """Without a 4D mask (the flash-attention path), transformers reads the packing from the position ids."""
    from llava_train.model import llava_arch

    model = _model("pad", "flat")
    samples = _samples(model, [1, 0, 2, 1], seed=5)
    batch = _strip(PackingCollator(0)([samples[:3], samples[3:]]))
    with torch.no_grad():
        block = model(**batch).logits  # [2, T, V]
        monkeypatch.setattr(llava_arch, "packed_attention_mask", lambda *args: None)
        by_position = model(**batch).logits  # [1, N, V]: the rows' real tokens, end to end
    lengths = [sum(s["length"] for s in samples[:3]), sum(s["length"] for s in samples[3:])]
    real = torch.cat([block[r, :n] for r, n in enumerate(lengths)])[None]
    assert block.shape[1] == max(lengths) and min(lengths) < max(lengths)  # one row had padding
    torch.testing.assert_close(by_position, real, rtol=1e-5, atol=1e-5)


def test_packed_segments_are_the_runs_of_restarting_positions():
    from llava_train.model.varlen import packed_segments

    seq_ids = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3]])
    assert packed_segments(packed_position_ids(seq_ids)) == [[(0, 3), (3, 5), (5, 7)], [(0, 7)]]


@pytest.mark.parametrize(
    "side,preset,window",
    [
        ("left", "tiny", None),
        ("right", "tiny", None),
        ("right", "tiny_mistral", 8),  # samples longer than the window: banded per row
        ("left", "tiny_gemma3", None),  # its preset's 8-token sliding layers beside full ones
        ("right", "tiny_qwen2_siglip", None),
    ],
)
def test_sdpa_varlen_trains_padded_rows_padding_free(side, preset, window):
    """No seq_ids: in training, padded rows reach the decoder as one row of their real tokens, with the
    same loss and gradients as sdpa on the padded rows; in eval they run as sdpa (logits [b, T, V])."""
    results, seen = {}, {}
    for attn in ("sdpa", "sdpa_varlen"):
        model = _model("anyres", "spatial_unpad", attn, preset).train()
        model.config.tokenizer_padding_side = side  # the merge pads on this side
        if window:
            model.config.sliding_window = window
        samples = _samples(model, [1, 0, 2])
        shapes = seen[attn] = []
        model.get_model().register_forward_pre_hook(
            lambda _, args, kwargs, shapes=shapes: shapes.append(kwargs["inputs_embeds"].shape[:2]),
            with_kwargs=True,
        )
        batch = DataCollator(0)(samples)
        results[attn] = _loss_and_grads(model, batch, _supervised(samples))
        with torch.no_grad():
            model.eval()
            logits = model(**_strip(batch)).logits
            assert logits.shape[:2] == shapes[-1]
    lengths = [s["length"] for s in samples]
    assert seen["sdpa_varlen"][0] == (1, sum(lengths)) and seen["sdpa"][0] == (3, max(lengths))
    assert seen["sdpa_varlen"][1] == seen["sdpa"][1] == (3, max(lengths))  # eval: padded rows, as sdpa
    (loss, grads), (loss_ref, grads_ref) = results["sdpa_varlen"], results["sdpa"]
    assert torch.isfinite(loss_ref)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sdpa_varlen_builds_no_mask_in_training(monkeypatch):
    """Training rows carry their segments to the kernel: transformers' [1, 1, N, N] mask is never built."""
    import transformers.masking_utils as masking

    built = []
    sdpa_mask = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: built.append(1) or sdpa_mask(*a, **k))
    model = _model("pad", "flat", "sdpa_varlen").train()
    samples = _samples(model, [1, 0, 2, 1], seed=3)
    _loss_and_grads(model, PackingCollator(0)([samples[:2], samples[2:]]), _supervised(samples))
    _loss_and_grads(model, DataCollator(0)(samples), _supervised(samples))
    assert built == []
    with torch.no_grad():  # eval on padded rows: sdpa's own mask
        model.eval()(**_strip(DataCollator(0)(samples)))
    assert built


def test_drop_padding_joins_real_tokens_and_ignores_each_rows_first_label():
    from llava_train.model.varlen import row_segments

    real = torch.tensor([[False, True, True], [True, True, False], [False, False, False]])
    embeds = torch.arange(9.0).view(3, 3, 1)
    labels = torch.tensor([[-100, 11, 12], [20, 21, -100], [-100, -100, -100]])
    positions = torch.arange(3).expand(3, 3)
    e, p, y = drop_padding(real, embeds, positions, labels)
    assert e.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert p.tolist() == [[1, 2, 0, 1]]
    assert y.tolist() == [[IGNORE_INDEX, 12, IGNORE_INDEX, 21]]  # nothing real precedes 11 or 20
    assert labels[0, 1] == 11  # the caller's labels are left alone
    assert row_segments(real.sum(1).tolist()) == [[(0, 2), (2, 4)]]


def test_sdpa_varlen_keeps_sdpa_for_masks_with_holes_and_takes_unsqueezed_positions():
    """A row whose real tokens are not one run trains as sdpa (padded); [1, T] position ids are expanded."""
    results, seen = {}, []
    for attn in ("sdpa", "sdpa_varlen"):
        model = _model("pad", "flat", attn).train()
        if attn == "sdpa_varlen":
            model.get_model().register_forward_pre_hook(
                lambda _, args, kwargs: seen.append(tuple(kwargs["inputs_embeds"].shape[:2])),
                with_kwargs=True,
            )
        ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
        labels = ids.clone()
        labels[:, :2] = IGNORE_INDEX
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[0, 4:6] = 0  # a hole
        hole = _loss_and_grads(model, dict(input_ids=ids, labels=labels, attention_mask=mask), 16)[0]
        mask[0, 4:6], mask[1, 7:] = 1, 0  # right padding, positions as transformers unsqueezes them
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)  # as the collators label padding
        batch = dict(input_ids=ids, labels=labels, attention_mask=mask, position_ids=torch.arange(10)[None])
        results[attn] = hole, _loss_and_grads(model, batch, 13)[0]
    assert seen == [(2, 10), (1, 17)]  # the hole stays padded; the right-padded rows are joined
    torch.testing.assert_close(results["sdpa_varlen"], results["sdpa"], rtol=1e-5, atol=1e-6)
