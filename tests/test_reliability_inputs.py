"""Bad inputs get a clear error naming the file / setting and the fix (issue 19, items 7-17)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_utils import compose_config, make_colour_dataset, run_steps, tiny_overrides

from llava_train.config import to_typed
from llava_train.data.errors import BadRecordError
from llava_train.data.image import load_image
from llava_train.data.sources import file_source
from llava_train.train import steps


@pytest.fixture(scope="module")
def data_json(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=16)


def _overrides(data_json: Path, run_dir: Path, *extra: str, stage: str = "pretrain", **training) -> list[str]:
    return [
        f"+stage={stage}",
        "stage.pretrain_mm_mlp_adapter=null",
        "stage.lora.r=4",
        "data.num_workers=0",
        *tiny_overrides(data_json, run_dir, **{"max_steps": 2, "save_steps": 100, **training}),
        *extra,
    ]


def _jsonl(path: Path, data_json: Path, bad_line: bytes, at: int = 3) -> Path:
    lines = [json.dumps(r).encode() for r in json.loads(data_json.read_text())]
    lines.insert(at - 1, bad_line)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


# ---- 7. malformed / non-UTF-8 data files ------------------------------------------------------------
@pytest.mark.parametrize(
    "bad, where",
    [
        (b'{"id": "x", "conversations": [}', r":3:31: not valid JSON"),
        (b'{"id": "caf\xe9"}', r":3:12: not UTF-8"),
    ],
)
def test_a_malformed_jsonl_line_names_file_line_and_column_before_the_model_is_built(
    data_json, tmp_path, monkeypatch, bad, where
):
    path = _jsonl(tmp_path / "train.jsonl", data_json, bad)
    raw = compose_config(_overrides(data_json, tmp_path / "run", f"data.data_path={path}"))
    built = []
    monkeypatch.setattr(steps, "build_tokenizer", lambda cfg: built.append(cfg))
    with pytest.raises(ValueError, match=re.escape(str(path)) + where + ".*bad_record_policy=skip"):
        run_steps(raw)
    assert not built  # refused at step 1


def test_under_skip_a_malformed_jsonl_line_is_a_counted_skip(data_json, tmp_path):
    path = _jsonl(tmp_path / "train.jsonl", data_json, b"{not json", at=5)
    source = file_source(path, str(data_json.parent), bad_record_policy="skip")
    assert len(source) == 16 and len(source.malformed) == 1 and ":5:2:" in source.malformed[0]
    raw = compose_config(
        _overrides(data_json, tmp_path / "run", f"data.data_path={path}", "data.bad_record_policy=skip")
    )
    trainer, _, _ = run_steps(raw)
    assert trainer.bad_record_counts.get("malformed_record") == 1


@pytest.mark.parametrize(
    "text, where",
    [('[{"id": 1},\n {"id": 2,, }]', ":2:11: not valid JSON"), ('[{"id": "\xe9"}]', ":1:10: not UTF-8")],
)
def test_a_malformed_json_file_names_line_and_column(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + where):
        file_source(path, cache_dir=str(tmp_path / "cache"))


# ---- 8. nonexistent model.llm_path --------------------------------------------------------------------
def test_a_nonexistent_llm_path_says_the_path_does_not_exist(data_json, tmp_path):
    raw = compose_config(_overrides(data_json, tmp_path / "run", f"model.llm_path={tmp_path / 'nope'}"))
    with pytest.raises(FileNotFoundError, match=f"model.llm_path='{tmp_path / 'nope'}' does not exist"):
        run_steps(raw)


# ---- 9. grid pinpoints that are not multiples of the crop -----------------------------------------------
def test_grid_pinpoints_off_the_crop_size_are_refused_with_the_fix(data_json, tmp_path):
    raw = compose_config(
        _overrides(data_json, tmp_path / "run", "model.image_grid_pinpoints=[[56,100],[112,56]]")
    )
    cfg = to_typed(raw)
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    with pytest.raises(
        ValueError, match=r"model.image_grid_pinpoints: canvases \[\(56, 100\)\].*\[\[56, 112\]"
    ):
        steps.build_data(cfg, tokenizer, model)


# ---- 11. range checks ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("training.learning_rate=-1", r"training.learning_rate=-1.0 \(must be > 0\)"),
        ("training.adam_beta2=1.5", r"adam_beta2=1.5 \(must be in \[0, 1\)\)"),
        ("training.save_steps=0", r"save_steps=0 \(must be > 0\)"),
        ("stage.lora.dropout=1.0", r"dropout=1.0"),
        ("data.num_workers=-2", r"num_workers=-2"),
    ],
)
def test_out_of_range_numbers_are_refused(data_json, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        to_typed(compose_config(_overrides(data_json, tmp_path, override)))


# ---- 12. duplicate ids ------------------------------------------------------------------------------------
def test_duplicate_record_ids_are_warned_once_with_count_and_examples(data_json, tmp_path, caplog):
    records = json.loads(data_json.read_text())
    records[3]["id"] = records[7]["id"] = records[1]["id"]
    path = tmp_path / "dupes.json"
    path.write_text(json.dumps(records))
    raw = compose_config(_overrides(data_json, tmp_path / "run", f"data.data_path={path}"))
    cfg = to_typed(raw)
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    with caplog.at_level(logging.WARNING):
        steps.build_data(cfg, tokenizer, model)
    warned = [r.getMessage() for r in caplog.records if "repeat an earlier record's id" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 records") and records[1]["id"] in warned[0]


# ---- 13. image_too_large: max_image_pixels works up to PIL's own limit, and the message says so --------
def test_max_image_pixels_admits_images_past_pil_warning_limit_and_names_pil_hard_limit(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL warns past 1000, refuses past 2000
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "1600.png")
    Image.new("RGB", (50, 50), (1, 2, 3)).save(tmp_path / "2500.png")
    assert load_image(tmp_path / "1600.png", max_pixels=5000).size == (40, 40)
    with pytest.raises(
        BadRecordError, match="beyond PIL's own limit.*cannot admit more than PIL's own limit"
    ):
        load_image(tmp_path / "2500.png", max_pixels=5000)
    with pytest.raises(BadRecordError, match="1600.png' is 40x40 > 1500 pixels"):
        load_image(tmp_path / "1600.png", max_pixels=1500)


# ---- 14. JSON index cache keyed on content -------------------------------------------------------------
def test_the_json_cache_sees_a_same_size_edit_that_kept_the_mtime(data_json, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(data_json.read_text())
    first = file_source(path, cache_dir=str(tmp_path / "cache"))
    assert first.record(0)["conversations"][1]["value"] != "XXXXXXXX"
    stat = path.stat()
    records = json.loads(path.read_text())
    old = records[0]["conversations"][1]["value"]
    records[0]["conversations"][1]["value"] = "X" * len(old)
    path.write_text(json.dumps(records))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_source(path, cache_dir=str(tmp_path / "cache")).record(0)["conversations"][1][
        "value"
    ] == "X" * len(old)


# ---- 15. WANDB_MODE set but empty ------------------------------------------------------------------------
def test_an_empty_wandb_mode_means_unset_and_a_wrong_one_is_refused(data_json, tmp_path, monkeypatch):
    from llava_train.train.args import build_training_args

    cfg = to_typed(compose_config(_overrides(data_json, tmp_path, "training.wandb_mode=disabled")))
    monkeypatch.setenv("WANDB_MODE", "")
    assert build_training_args(cfg).report_to == [] and os.environ["WANDB_MODE"] == "disabled"
    monkeypatch.setenv("WANDB_MODE", "offlin")
    with pytest.raises(ValueError, match="WANDB_MODE='offlin' .* not one of"):
        build_training_args(cfg)


# ---- 16 / 17. a LoRA run on a random LLM can be merged; skip totals at the end ---------------------------
def test_a_lora_run_on_a_random_llm_saves_its_base_and_merges_to_the_trained_model(
    data_json, tmp_path, caplog
):
    from llava_train.export.lora import merge_lora

    records = json.loads(data_json.read_text())
    records[2]["image"] = "missing.png"
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    raw = compose_config(
        _overrides(
            data_json,
            tmp_path / "run",
            f"data.data_path={path}",
            "data.bad_record_policy=skip",
            stage="finetune_lora",
        )
    )
    with caplog.at_level(logging.WARNING):
        trainer, model, _ = run_steps(raw)
    totals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bad records in this run")]
    assert totals and "'missing_image': 1" in totals[0] and "once per epoch" in totals[0]
    base = tmp_path / "run" / steps.RANDOM_BASE_DIR
    assert (base / "config.json").is_file()
    merged = merge_lora(base, tmp_path / "run")
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
