"""`data.packing=true` through the trainer: packed rows (seq_ids) reach the model and the loss falls."""

import logging

import pytest
import torch
from train_utils import compose_config, logged_losses, make_colour_dataset, run_steps, tiny_overrides

from llava_train.config import to_typed
from llava_train.data.packing import PackedDataset
from llava_train.train import steps


def test_finetune_with_packing_trains_on_packed_rows(tmp_path):
    data_json = make_colour_dataset(tmp_path / "data", n=48)
    raw = compose_config(
        [
            "+stage=finetune",
            "stage.pretrain_mm_mlp_adapter=null",
            "data.packing=true",
            "model.model_max_length=256",
            *tiny_overrides(data_json, tmp_path / "run", learning_rate=1e-3, max_steps=8),
            "training.global_batch_size=2",
            "training.per_device_batch_size=2",
        ]
    )
    seen = []

    def spy(model):
        forward = model.forward

        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("seq_ids"))
            return forward(*args, **kwargs)

        model.forward = wrapped

    trainer, _, _ = run_steps(raw, before_train=spy)
    assert isinstance(trainer.train_dataset, PackedDataset) and len(trainer.train_dataset) < 48
    assert seen and all(s is not None and int(s.max()) > 1 for s in seen)  # several samples per row
    losses = list(logged_losses(trainer).values())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_finetune_under_sdpa_varlen_logs_the_losses_of_sdpa(tmp_path):
    """Unpacked, through the trainer: sdpa_varlen trains the padded rows padding-free, same losses."""
    data_json = make_colour_dataset(tmp_path / "data", n=24)
    losses, positions = {}, {}
    for attn in ("sdpa", "sdpa_varlen"):
        shapes = positions[attn] = []

        def spy(model, shapes=shapes):
            model.get_model().register_forward_pre_hook(
                lambda _, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])),
                with_kwargs=True,
            )

        raw = compose_config(
            [
                "+stage=finetune",
                "stage.pretrain_mm_mlp_adapter=null",
                f"model.attn_implementation={attn}",
                *tiny_overrides(data_json, tmp_path / attn, learning_rate=1e-3, max_steps=4),
                "training.global_batch_size=4",
                "training.per_device_batch_size=4",
            ]
        )
        trainer, _, _ = run_steps(raw, before_train=spy)
        losses[attn] = torch.tensor(list(logged_losses(trainer).values()))
    assert len(losses["sdpa"]) == 4 and torch.isfinite(losses["sdpa"]).all()
    assert all(rows == 1 for rows, _ in positions["sdpa_varlen"])
    padded = sum(rows * n for rows, n in positions["sdpa"])
    assert sum(n for _, n in positions["sdpa_varlen"]) < padded  # the merged rows' padding was dropped
    torch.testing.assert_close(losses["sdpa_varlen"], losses["sdpa"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
def test_packing_under_sdpa_points_to_sdpa_varlen(tmp_path, caplog, attn):
    data_json = make_colour_dataset(tmp_path / "data", n=8)
    overrides = ["+stage=finetune", "stage.pretrain_mm_mlp_adapter=null", "data.packing=true"]
    overrides += [f"model.attn_implementation={attn}", *tiny_overrides(data_json, tmp_path / "run")]
    cfg = to_typed(compose_config(overrides))
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    with caplog.at_level(logging.INFO, logger="llava_train.train.steps"):
        steps.build_data(cfg, tokenizer, model)
    hinted = "model.attn_implementation=sdpa_varlen trains the same rows" in caplog.text
    assert hinted == (attn == "sdpa")
