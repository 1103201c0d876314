"""The demo builder: layout, counts, held-out split, and every record loads through the dataset."""

import importlib.util
import json
from pathlib import Path

import pytest

from llava_train.data import DataCollator, DataConfig, VisionSpec, build_dataset
from llava_train.data.image import build_image_processor
from llava_train.data.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _build_demo_module():
    spec = importlib.util.spec_from_file_location("build_demo", ROOT / "data" / "build_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    meta = _build_demo_module().build(out, n_stage1=40, n_stage2=60, n_eval=20, seed=0)
    return out, meta


def test_layout_and_counts(demo):
    out, meta = demo
    assert (meta["stage1"], meta["stage2"], meta["eval"]) == (40, 60, 20)
    questions = [json.loads(line) for line in (out / "eval" / "questions.jsonl").read_text().splitlines()]
    answers = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    assert [q["question_id"] for q in questions] == [a["question_id"] for a in answers]
    assert all(q["image"].startswith("eval/") and (out / "images" / q["image"]).is_file() for q in questions)
    train_images = {
        r.get("image")
        for name in ("stage1.json", "stage2.json")
        for r in json.loads((out / name).read_text())
    }
    assert not any(str(p).startswith("eval/") for p in train_images)


@pytest.mark.parametrize(
    ("name", "template", "aspect", "pinpoints"),
    [
        ("stage1.json", "plain", "pad", None),
        (
            "stage2.json",
            "vicuna_v1",
            "anyres",
            "[[56, 56], [112, 56], [168, 56], [224, 56], [56, 112], [112, 112]]",
        ),
    ],
)
def test_every_record_loads(demo, name, template, aspect, pinpoints):
    out, _ = demo
    cfg = DataConfig(
        data_path=str(out / name),
        image_folder=str(out / "images"),
        template=template,
    )
    vision = VisionSpec(56, 4, "spatial_unpad", image_aspect_ratio=aspect, image_grid_pinpoints=pinpoints,
                        model_max_length=512)  # fmt: skip
    ds = build_dataset(cfg, load_tokenizer("mistral"), build_image_processor(56), vision)
    samples = [ds[i] for i in range(len(ds))]
    assert ds.bad_record_stats() == {}
    batch = DataCollator(0)(samples[:8])
    assert batch["input_ids"].shape[0] == 8


def test_tower_pairs_cover_every_training_digit_once(demo):
    out, meta = demo
    pairs = json.loads((out / "tower_pairs.json").read_text())
    assert len(pairs) == meta["tower_pairs"] == meta["train_digits"]
    assert all(p["image"].startswith("train/") and (out / "images" / p["image"]).is_file() for p in pairs)
    assert {p["caption"] for p in pairs} == {f"the digit {d}" for d in range(10)}
    assert len({p["image"] for p in pairs}) == len(pairs)


def test_stage2_asks_one_question_after_the_image_as_the_eval_does(demo):
    """The default stage-2 conversations have the held-out questions' shape: "<image>\\n" then one question."""
    out, meta = demo
    records = [r for r in json.loads((out / "stage2.json").read_text()) if "image" in r]
    assert records and meta["stage2_sum_weight"] == 3
    assert all(len(r["conversations"]) == 2 for r in records)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in records)


def test_sum_questions_weighted_in_one_question_data(tmp_path):
    """A composite image is asked its sum 3x as often as each other question (read: strips only)."""
    _build_demo_module().build(tmp_path, n_stage1=4, n_stage2=400, n_eval=4, seed=0)
    asked = [r["conversations"][0]["value"] for r in json.loads((tmp_path / "stage2.json").read_text())]
    sums = sum("sum of the digits" in q for q in asked)
    reads = sum("Read the digits" in q for q in asked)
    # Expected sums / reads: 0.48 / 0.10 of composites (0.24 / 0.14 if sums were not weighted).
    assert reads > 0 and sums > 2.5 * reads, (sums, reads)


def test_sums_are_answered_worked_out(demo):
    """A sum's answer reads the terms, then gives their sum; text-only questions add the same way."""
    worked_sum = _build_demo_module().worked_sum
    assert worked_sum([8, 6]) == "8 + 6 = 14"
    assert worked_sum([4, 8, 3, 6]) == "4 + 8 + 3 + 6 = 21"
    out, _ = demo
    answers = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    records = json.loads((out / "stage2.json").read_text())
    replies = [r["conversations"][1]["value"] for r in records if "sum" in r["conversations"][0]["value"]]
    replies += [a["answer"] for a in answers if a["category"] == "sum"]
    text_only = [r["conversations"] for r in records if "image" not in r]
    assert replies and text_only
    for reply in replies + [turns[1]["value"] for turns in text_only]:
        terms = [int(t) for t in reply.split(" = ")[0].split(" + ")]
        assert 2 <= len(terms) <= 4 and reply == worked_sum(terms), reply
    for turns in text_only:  # "What is 3 + 5?" -> "3 + 5 = 8"
        assert turns[0]["value"] == f"What is {turns[1]['value'].split(' = ')[0]}?"
