"""Collator batch format (docs/INTERFACES.md) and the length / modality samplers."""

import logging

import torch

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.data.collator import DataCollator
from llava_train.data.sampler import LengthGroupedSampler, ModalityLengthGroupedSampler


def _sample(n, sid, images=None, sizes=(), supervised=True):
    ids = torch.arange(1, n + 1)
    ids[0] = IMAGE_TOKEN_INDEX if images is not None else 5
    labels = ids.clone() if supervised else torch.full((n,), IGNORE_INDEX)
    labels[0] = IGNORE_INDEX
    return {
        "input_ids": ids,
        "labels": labels,
        "images": images,
        "image_sizes": list(sizes),
        "sample_id": sid,
    }


def test_collator_pads_right_and_left():
    img = torch.zeros(1, 3, 8, 8)
    samples = [
        _sample(3, "a", img, [(8, 8)]),
        _sample(5, "b"),
        _sample(2, "c", torch.ones(2, 3, 8, 8), [(4, 8), (8, 4)]),
    ]
    batch = DataCollator(0)(samples)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images", "image_sizes", "sample_ids"}
    assert batch["input_ids"].shape == (3, 5) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].sum(1).tolist() == [
        3,
        5,
        2,
    ]
    assert (
        batch["input_ids"][0, 3:].tolist() == [0, 0] and batch["labels"][0, 3:].tolist() == [IGNORE_INDEX] * 2
    )
    assert batch["images"].shape == (3, 3, 8, 8) and batch["image_sizes"] == [(8, 8), (4, 8), (8, 4)]
    assert batch["sample_ids"] == ["a", "b", "c"]
    left = DataCollator(0, padding_side="left")(samples)
    assert left["input_ids"][2, :3].tolist() == [0, 0, 0] and left["attention_mask"][2].tolist() == [
        0,
        0,
        0,
        1,
        1,
    ]


def test_collator_text_only_anyres_and_warning(caplog):
    assert DataCollator(0)([_sample(3, "a"), _sample(2, "b")])["images"] is None
    crops = [torch.zeros(3, 3, 8, 8)]
    batch = DataCollator(0)(
        [
            _sample(3, "a", crops, [(16, 8)]),
            _sample(3, "b"),
            _sample(3, "c", [torch.ones(5, 3, 8, 8)], [(9, 9)]),
        ]
    )
    assert [t.shape[0] for t in batch["images"]] == [3, 5]
    with caplog.at_level(logging.WARNING):
        DataCollator(0)([_sample(3, "z", supervised=False)])
    assert "no supervised token" in caplog.text


def _global_batches(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def test_modality_batches_single_modality_and_deterministic():
    lengths = [(i % 7 + 1) * (1 if i % 3 else -1) for i in range(103)]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, grad_accum=3, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % 12 == 0
    assert set(order) == set(range(103))
    for batch in _global_batches(order, 12):
        assert len({lengths[i] > 0 for i in batch}) == 1
    assert order == list(ModalityLengthGroupedSampler(lengths, 2, 2, 3, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_one_modality_only_works():
    for sign in (1, -1):
        lengths = [sign * (i + 1) for i in range(10)]
        order = list(ModalityLengthGroupedSampler(lengths, batch_size=4))
        assert sorted(set(order)) == list(range(10)) and len(order) == 12


def test_length_grouping_sorts_within_global_batch():
    lengths = list(torch.randint(1, 500, (64,), generator=torch.Generator().manual_seed(0)))
    order = list(LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=3))
    assert sorted(order) == list(range(64))
    for batch in _global_batches(order, 8):
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
