"""Datasets: JSON / JSONL / YAML mixtures / HF backends, bad-record policies (one test per kind), lengths
(estimates, and exact_lengths for packing)."""

import dataclasses
import json
import os

import pytest
import torch
from PIL import Image

import llava_train.data.dataset as dataset_module
from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.data import BadRecordError, DataCollator, DataConfig, VisionSpec, build_dataset
from llava_train.data.image import build_image_processor
from llava_train.data.mixture import sample_indices
from llava_train.data.packing import PackingCollator, build_packed_dataset
from llava_train.data.tokenizers import load_tokenizer

PINPOINTS = "[[56, 56], [112, 56], [56, 112], [112, 112]]"
VISION = VisionSpec(crop_size=56, patches_per_side=4, mm_patch_merge_type="spatial_unpad")


def _turns(*pairs):
    out = []
    for q, a in pairs:
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return out


GOOD = [
    {"id": "img1", "image": "a.png", "conversations": _turns(("What digit?\n<image>", "7"))},
    {"id": "txt1", "conversations": _turns(("Hi", "Hello."), ("Bye", "Bye!"))},
    {"id": "img2", "image": ["a.png", "sub/b.png"], "conversations": _turns(("<image><image> same?", "no"))},
    {"id": "sys1", "system": "Be brief.", "conversations": _turns(("2+2?", "4"))},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mistral")


@pytest.fixture(scope="module")
def processor():
    return build_image_processor(56)


@pytest.fixture()
def root(tmp_path):
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.new("RGB", (112, 56), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    Image.new("L", (40, 90), 128).save(tmp_path / "img" / "sub" / "b.png")
    return tmp_path


def _write(root, records, name="d.json"):
    path = root / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


_GEOMETRY = ("model_max_length", "image_aspect_ratio", "image_grid_pinpoints")


def _dataset(root, tokenizer, processor, records, name="d.json", **overrides):
    """Geometry overrides go to the model's VisionSpec, the rest to the DataConfig."""
    geometry = {k: overrides.pop(k) for k in _GEOMETRY if k in overrides}
    cfg = DataConfig(
        data_path=_write(root, records, name),
        image_folder=str(root / "img"),
        cache_dir=str(root / "cache"),
        **overrides,
    )
    return build_dataset(cfg, tokenizer, processor, dataclasses.replace(VISION, **geometry))


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_json_and_jsonl_samples(root, tokenizer, processor, name):
    ds = _dataset(root, tokenizer, processor, GOOD, name)
    assert len(ds) == 4
    sample = ds[0]
    assert sample["sample_id"] == "img1" and sample["images"].shape == (1, 3, 56, 56)
    assert sample["image_sizes"] == [(112, 56)]
    assert (sample["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert sample["length"] == len(sample["input_ids"]) - 1 + 16  # pad: P*P tokens
    assert ds[1]["images"] is None and ds[1]["image_sizes"] == []
    assert ds[2]["images"].shape == (2, 3, 56, 56)
    assert "Be brief." in tokenizer.decode(ds[3]["input_ids"])
    assert ds.modality_lengths[1] < 0 < ds.modality_lengths[0]


def test_anyres_samples_and_exact_length(root, tokenizer, processor):
    ds = _dataset(
        root, tokenizer, processor, GOOD, image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS
    )
    sample = ds[0]
    assert isinstance(sample["images"], list) and sample["images"][0].shape == (3, 3, 56, 56)  # base + 2x1
    # spatial_unpad, 112x56 image on a 2x1 grid: 16 base + 4 rows x (8 + 1 newline)
    assert sample["length"] == len(sample["input_ids"]) - 1 + 16 + 4 * 9
    batch = DataCollator(tokenizer)([ds[i] for i in range(4)])
    assert len(batch["images"]) == 3 and batch["image_sizes"] == [(112, 56), (112, 56), (40, 90)]


def test_yaml_mixture_and_sampling(root, tokenizer, processor):
    _write(root, GOOD, "a.json")
    _write(root, GOOD, "b.jsonl")
    (root / "mix.yaml").write_text(
        "datasets:\n  - json_path: a.json\n    sampling_strategy: first:1\n"
        "  - json_path: b.jsonl\n    sampling_strategy: random:50%\n"
    )
    cfg = DataConfig(
        data_path=str(root / "mix.yaml"), image_folder=str(root / "img"), cache_dir=str(root / "c")
    )
    ds = build_dataset(cfg, tokenizer, processor, VISION)
    assert len(ds) == 3 and ds[0]["sample_id"] == "img1"
    assert sample_indices("end:2", 5, 0) == [3, 4]
    assert sample_indices("random:2", 10, 1) == sample_indices("random:2", 10, 1)
    assert len(sample_indices("random:10%", 100, 0)) == 10
    with pytest.raises(ValueError, match="sampling_strategy"):
        sample_indices("middle:3", 5, 0)


def test_hf_backend_paths_and_bytes(root, tokenizer, processor):
    datasets = pytest.importorskip("datasets")
    png = (root / "img" / "a.png").read_bytes()
    convs = [_turns(("<image>\nDigit?", "7")), _turns(("Hi", "Hello"))]
    by_path = {"id": ["p", "t"], "image": ["a.png", None], "conversations": convs}
    by_bytes = {"id": ["b", "t"], "image": [png, None], "conversations": convs}
    datasets.Dataset.from_dict(by_path).save_to_disk(str(root / "hf"))
    (root / "pq").mkdir()
    datasets.Dataset.from_dict(by_bytes).to_parquet(str(root / "pq" / "part0.parquet"))
    samples = []
    for folder in ("hf", "pq"):
        cfg = DataConfig(data_path=str(root / folder), image_folder=str(root / "img"))
        ds = build_dataset(cfg, tokenizer, processor, VISION)
        samples.append(ds[0])
        assert ds[1]["images"] is None and ds.modality_lengths[1] < 0
        assert ds.exact_lengths() == [ds[0]["length"], ds[1]["length"]]  # image by path and by bytes
    assert [s["sample_id"] for s in samples] == ["p", "b"]
    assert torch.equal(samples[0]["images"], samples[1]["images"])
    assert torch.equal(samples[0]["input_ids"], samples[1]["input_ids"])


def _bad_cases(root):
    """(kind, record) for every bad-record kind."""
    (root / "img" / "empty.png").write_bytes(b"")
    (root / "img" / "corrupt.png").write_bytes((root / "img" / "a.png").read_bytes()[:60])
    Image.new("RGB", (400, 400)).save(root / "img" / "big.png")
    (root / "outside.png").write_bytes((root / "img" / "a.png").read_bytes())
    os.symlink(root / "outside.png", root / "img" / "link.png")
    img = lambda path, q="<image>\nDigit?": {"image": path, "conversations": _turns((q, "7"))}  # noqa: E731
    return [
        ("missing_image", img("nope.png")),
        ("unreadable_image", img("empty.png")),
        ("unreadable_image", img("corrupt.png")),
        ("image_too_large", img("big.png")),
        ("image_count_mismatch", img("a.png", "Digit?")),
        ("image_count_mismatch", {"image": ["a.png"], "conversations": _turns(("<image> <image>", "7"))}),
        ("bad_conversation", {"conversations": []}),
        ("bad_conversation", {"conversations": [{"from": "human"}]}),
        ("bad_conversation", {"conversations": _turns(("Hi", "  "))}),
        (
            "roles_out_of_order",
            {"conversations": [{"from": "gpt", "value": "7"}, {"from": "human", "value": "?"}]},
        ),
        ("too_long", {"conversations": _turns(("word " * 300, "7"))}),
        ("path_escapes_root", img("../outside.png")),
        ("path_escapes_root", img(str(root / "img" / "a.png"))),
        ("path_escapes_root", img("link.png")),
        ("path_escapes_root", img({"path": str(root / "img" / "a.png")})),
        ("path_escapes_root", img({"path": "../outside.png", "bytes": None})),
        ("missing_image", img({"path": ""})),
    ]


def test_each_bad_kind_strict_names_record_and_fix(root, tokenizer, processor):
    cases = _bad_cases(root)
    records = [dict(r, id=f"bad{i}") for i, (_, r) in enumerate(cases)]
    ds = _dataset(root, tokenizer, processor, records, model_max_length=128, max_image_pixels=100_000)
    for i, (kind, _) in enumerate(cases):
        with pytest.raises(BadRecordError) as info:
            ds[i]
        assert info.value.kind == kind, (i, info.value)
        assert f"bad{i}" in str(info.value) and "Fix:" in str(info.value)


def test_skip_policy_counts_and_replaces_deterministically(root, tokenizer, processor):
    cases = _bad_cases(root)
    records = [dict(r, id=f"bad{i}") for i, (_, r) in enumerate(cases)] + [dict(GOOD[0])]
    ds = _dataset(
        root,
        tokenizer,
        processor,
        records,
        model_max_length=128,
        max_image_pixels=100_000,
        bad_record_policy="skip",
    )
    samples = [ds[i] for i in range(len(cases))]
    assert {s["sample_id"] for s in samples} == {"img1"}  # the next good record, every time
    stats = ds.bad_record_stats()
    for kind in {k for k, _ in cases}:
        assert stats[kind] >= 1
    assert ds.log_bad_record_stats() == stats


def test_too_long_multiturn_drops_trailing_rounds(root, tokenizer, processor):
    long = _turns(("<image>\nDigit?", "7"), ("more " * 40, "ok"), ("again " * 40, "ok"))
    ds = _dataset(
        root,
        tokenizer,
        processor,
        [{"id": "t", "image": "a.png", "conversations": long}],
        model_max_length=110,
    )
    sample = ds[0]
    assert sample["length"] <= 110
    supervised = sample["labels"][sample["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(supervised).startswith("7")
    assert ds.bad_record_stats()["truncated_samples"] == 1 and ds.bad_record_stats()["truncated_turns"] >= 1


def test_lengths_are_cheap_estimates(root, tokenizer, processor):
    ds = _dataset(root, tokenizer, processor, GOOD)
    assert ds.lengths[1] == 4  # words only for text-only
    assert ds.lengths[0] == 4 + 16  # 4 words ("<image>" included) + one nominal image (pad: 16)


def test_skip_stats_reach_the_main_process_from_workers(root, tokenizer, processor):
    records = [{"id": "bad", "image": "nope.png", "conversations": _turns(("<image>", "7"))}, GOOD[0]]
    ds = _dataset(root, tokenizer, processor, records, bad_record_policy="skip")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=DataCollator(tokenizer))
    batch = next(iter(loader))
    assert batch["sample_ids"] == ["img1", "img1"]
    assert ds.bad_record_stats() == {"missing_image": 1}


def test_json_index_cache_and_in_memory_fallback(root):
    from llava_train.data.sources import JsonlSource, PackedSource, json_source

    path = _write(root, GOOD)
    cached = json_source(path, cache_dir=str(root / "cache"))
    assert isinstance(cached, JsonlSource) and [cached.record(i) for i in range(4)] == GOOD
    assert json_source(path, cache_dir=str(root / "cache")).path == cached.path  # reused
    (root / "blocker").write_text("not a directory")
    packed = json_source(path, cache_dir=str(root / "blocker"))
    assert isinstance(packed, PackedSource) and [packed.record(i) for i in range(4)] == GOOD


def test_vision_spec_comes_from_the_built_tower_not_its_name():
    from llava_train.model import ModelConfig, build_model

    tiny = build_model(ModelConfig(preset="tiny", hidden_size=64, intermediate_size=128))
    assert VisionSpec.from_model(tiny) == VisionSpec(
        56, 4, "spatial_unpad", False, False, "anyres", tiny.config.image_grid_pinpoints, 2048
    )
    # a name with another patch size in it: the tower's own config (patch 28, 112 px) decides
    renamed = ModelConfig(
        preset="tiny",
        hidden_size=64,
        intermediate_size=128,
        mm_patch_merge_type="flat",
        model_max_length=512,
        mm_vision_select_feature="cls_patch",
        vision_config={"patch_size": 28, "image_size": 112},
        image_grid_pinpoints=[[112, 112], [224, 112]],
    )
    model = build_model(renamed)
    model.config.mm_vision_tower = "clip-vit-patch14-336"
    spec = VisionSpec.from_model(model)
    assert (spec.crop_size, spec.patches_per_side, spec.cls_token, spec.model_max_length) == (
        112,
        4,
        True,
        512,
    )
    assert spec.image_grid_pinpoints == ((112, 112), (224, 112))
    assert spec.with_aspect_ratio("pad").image_aspect_ratio == "pad"
    with pytest.raises(ValueError, match="leave data.image_aspect_ratio unset"):
        dataclasses.replace(spec, image_aspect_ratio="pad").with_aspect_ratio("anyres")


# ---- exact_lengths: sample["length"] of every sample from tokens and image headers (packing) ----
LONG = {
    "id": "long",
    "image": "a.png",
    "conversations": _turns(("<image>\nDigit?", "7"), ("more " * 40, "ok"), ("again " * 40, "ok")),
}


def _no_image_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("exact_lengths must not load images")

    monkeypatch.setattr(dataset_module, "load_image", refuse)


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_max_length": 110},
        {"model_max_length": 170, "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS},
    ],
    ids=["pad", "anyres"],
)
def test_exact_lengths_equal_built_samples_without_loading_images(
    root, tokenizer, processor, overrides, monkeypatch
):
    ds = _dataset(root, tokenizer, processor, [*GOOD, LONG], **overrides)
    expected = [ds[i]["length"] for i in range(len(ds))]
    assert ds.bad_record_stats()["truncated_samples"] == 1  # LONG lost rounds: the truncated length counts
    stats = ds.bad_record_stats()
    _no_image_loading(monkeypatch)
    assert ds.exact_lengths() == expected
    assert ds.bad_record_stats() == stats  # nothing counted twice


def test_exact_lengths_are_cached(root, tokenizer, processor, monkeypatch):
    ds = _dataset(root, tokenizer, processor, GOOD)
    first = ds.exact_lengths()
    calls = []
    monkeypatch.setattr(dataset_module, "tokenize_conversation", lambda *a, **k: calls.append(a))
    assert ds.exact_lengths() == first and calls == []


def test_exact_lengths_in_workers(root, tokenizer, processor):
    ds = _dataset(root, tokenizer, processor, GOOD)
    again = _dataset(root, tokenizer, processor, GOOD, name="e.json")
    assert ds.exact_lengths(num_workers=1) == again.exact_lengths()


def test_exact_lengths_skip_gives_the_replacement_length_strict_names_the_record(root, tokenizer, processor):
    cases = _bad_cases(root)
    records = [dict(r, id=f"bad{i}") for i, (_, r) in enumerate(cases)] + [dict(GOOD[0])]
    limits = {"model_max_length": 128, "max_image_pixels": 100_000}
    skip = _dataset(root, tokenizer, processor, records, bad_record_policy="skip", **limits)
    good_length = skip[len(cases)]["length"]
    assert skip.exact_lengths() == [good_length] * len(records)  # every bad record is replaced by img1
    assert skip.bad_record_stats() == {}  # counted by __getitem__ only
    strict = _dataset(root, tokenizer, processor, records, name="s.json", **limits)
    with pytest.raises(BadRecordError) as info:
        strict.exact_lengths()
    assert info.value.kind == cases[0][0] and "bad0" in str(info.value)


def test_packing_bins_on_exact_lengths_without_loading_images(root, tokenizer, processor, monkeypatch):
    ds = _dataset(root, tokenizer, processor, GOOD, model_max_length=256)
    lengths = [ds[i]["length"] for i in range(len(ds))]
    _no_image_loading(monkeypatch)
    packed = build_packed_dataset(ds, max_length=256, by_modality=False)
    assert packed.lengths == [sum(lengths[i] for i in pack) for pack in packed.packs]
    assert sorted(i for pack in packed.packs for i in pack) == list(range(len(ds)))


def test_packed_rows_drop_bad_records_instead_of_overfilling(root, tokenizer, processor, caplog):
    """A JPEG corrupt past a valid header passes exact_lengths (headers only) and fails at decode. Its row
    must not take the next good record instead: that one's length is not the one the row was planned on."""
    Image.effect_noise((112, 56), 64).convert("RGB").save(root / "img" / "noise.jpg")
    data = (root / "img" / "noise.jpg").read_bytes()
    (root / "img" / "broken.jpg").write_bytes(data[: len(data) // 2])
    bad = {"id": "broken", "image": "broken.jpg", "conversations": _turns(("<image>\nDigit?", "7"))}
    long_text = {"id": "long_text", "conversations": _turns(("word " * 60, "ok"))}
    ds = _dataset(
        root, tokenizer, processor, [bad, long_text], model_max_length=256, bad_record_policy="skip"
    )
    lengths = ds.exact_lengths()
    assert lengths[0] < lengths[1]  # the bad record's own length: its header is fine
    packed = build_packed_dataset(ds, max_length=sum(lengths), by_modality=False)
    assert packed.packs == [[1, 0]]  # one row, exactly full
    assert 2 * lengths[1] > sum(lengths)  # long_text in the bad record's place would overfill it
    row = packed[0]
    assert [s["sample_id"] for s in row] == ["long_text"]
    assert ds.bad_record_stats() == {"unreadable_image": 1}
    assert "broken" in caplog.text and "dropping bad record" in caplog.text
    batch = PackingCollator(tokenizer, max_length=sum(lengths))([row])
    assert batch["seq_ids"].max() == 1 and batch["sample_ids"] == ["long_text"]
    # A row with nothing good left gets the usual replacement (counted once: the row's own bad record).
    alone = build_packed_dataset(ds, max_length=lengths[1], by_modality=False)
    assert alone.packs == [[1], [0]]
    assert [s["sample_id"] for s in alone[1]] == ["long_text"]
    assert ds.bad_record_stats() == {"unreadable_image": 2}
    strict = _dataset(root, tokenizer, processor, [bad, long_text], name="s.json", model_max_length=256)
    with pytest.raises(BadRecordError, match="broken"):
        build_packed_dataset(strict, max_length=sum(lengths), by_modality=False)[0]
