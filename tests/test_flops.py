"""FLOP accounting (llava_train/train/flops.py) against hand counts on tiny shapes, the shapes read off a
built model, per-sample lengths of collated batches, and the throughput log of a short training run."""

from __future__ import annotations

import json

import pytest
import torch
from train_utils import compose_config, make_colour_dataset, run_steps, tiny_overrides

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.train import flops as fl
from llava_train.train import throughput as tp

# A decoder: 2 layers, hidden 8, 2 query heads and 1 kv head of width 4, MLP 12, vocab 10.
LLM = fl.LlmShape(layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=12, vocab=10)
# A tower: 2 layers, hidden 4, MLP 8, patch 2 on 4 px crops (2 x 2 patches + CLS), feature from layer 1.
TOWER = fl.TowerShape(
    layers=2, hidden=4, intermediate=8, patch=2, image_size=4, cls_token=True, backward_layers=1
)
PROJECTOR = ((4, 8), (8, 8))  # mlp2x_gelu from the tower's 4 to the LLM's 8
LENGTHS = [3, 5]
CROPS = 2

# Hand counts (2 FLOPs per multiply-add).
PER_LAYER_WEIGHTS = 8 * (2 * 4) + 2 * 8 * (1 * 4) + (2 * 4) * 8 + 3 * 8 * 12  # q, k + v, o, gate + up + down
LLM_LINEAR = 2 * 2 * PER_LAYER_WEIGHTS * (3 + 5)
LLM_ATTENTION = 2 * 2 * 2 * (3 * 3 + 5 * 5) * (2 * 4)  # layers x (QK^T + AV) x 2 x L^2 x n_h d_h
LLM_HEAD = 2 * 8 * 10 * (3 + 5)
TOWER_TOKENS = 2 * 2 + 1
TOWER_LINEAR = 2 * CROPS * TOWER_TOKENS * (4 * 4 * 4 + 2 * 4 * 8) * 2  # x 2 layers
TOWER_ATTENTION = 2 * 2 * CROPS * TOWER_TOKENS**2 * 4 * 2
TOWER_PATCH = 2 * CROPS * (2 * 2) * (3 * 2 * 2) * 4
PROJ_1, PROJ_2 = 2 * 4 * 8 * (CROPS * 4), 2 * 8 * 8 * (CROPS * 4)  # the CLS feature is dropped


def _model(**trainable) -> fl.FlopModel:
    return fl.FlopModel(
        llm=LLM, tower=TOWER, projector=PROJECTOR, projector_tokens=4, trainable=fl.Trainable(**trainable)
    )


def test_forward_counts_match_hand_counts():
    assert fl.llm_forward(LLM, LENGTHS) == (LLM_LINEAR, LLM_ATTENTION, LLM_HEAD)
    assert fl.tower_forward(TOWER, CROPS) == (TOWER_LINEAR, TOWER_ATTENTION, TOWER_PATCH)
    assert fl.projector_forward(PROJECTOR, CROPS * 4) == [PROJ_1, PROJ_2]


def test_sliding_window_caps_the_keys_per_query():
    windowed = fl.LlmShape(**{**LLM.__dict__, "windows": (4, None)})  # layer 0 sliding (W = 4), layer 1 full
    _, attention, _ = fl.llm_forward(windowed, LENGTHS)
    assert attention == 2 * 2 * (3 * 3 + 5 * 4) * 8 + 2 * 2 * (3 * 3 + 5 * 5) * 8


def test_pretrain_llm_frozen_passes_input_grads_to_the_projector():
    """Stage 1: the frozen LLM costs 2x forward (input grads), the frozen tower 1x, the projector 3x less the
    first linear's input grad (nothing before it trains)."""
    got = fl.training_flops(_model(projector=True), LENGTHS, CROPS)
    llm = (LLM_LINEAR + LLM_ATTENTION + LLM_HEAD) + (LLM_LINEAR + 2 * LLM_ATTENTION + LLM_HEAD)
    vision = (TOWER_LINEAR + TOWER_ATTENTION + TOWER_PATCH) + (PROJ_1 + PROJ_2) + (PROJ_1 + PROJ_2) + PROJ_2
    assert got.model == llm + vision
    assert got.hardware == got.model and got.tokens == 8


def test_full_finetune_is_three_forwards_of_the_llm():
    got = fl.training_flops(_model(llm=True, lm_head=True, embeddings=True, projector=True), LENGTHS, CROPS)
    llm = 3 * (LLM_LINEAR + LLM_ATTENTION + LLM_HEAD)
    vision = (TOWER_LINEAR + TOWER_ATTENTION + TOWER_PATCH) + 2 * (PROJ_1 + PROJ_2) + PROJ_2
    assert got.model == llm + vision


def test_the_lm_head_counts_the_supervised_rows_only():
    """Training computes logits only where a label is supervised: the lm_head counts those rows."""
    trained = _model(llm=True, lm_head=True, embeddings=True, projector=True)
    every = fl.training_flops(trained, LENGTHS, CROPS)
    got = fl.training_flops(trained, LENGTHS, CROPS, supervised=3)
    assert every.model - got.model == 3 * 2 * 8 * 10 * (8 - 3)  # fwd + input grad + weight grad
    frozen_head = fl.training_flops(_model(projector=True), LENGTHS, CROPS, supervised=3)
    assert fl.training_flops(_model(projector=True), LENGTHS, CROPS).model - frozen_head.model == (
        2 * 2 * 8 * 10 * (8 - 3)  # fwd + input grad
    )
    image = IMAGE_TOKEN_INDEX
    batch = {
        "input_ids": torch.tensor([[1, image, 6, 7, 8], [1, 9, 9, 9, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "labels": torch.tensor([[-100, image, -100, 7, 8], [-100, -100, 9, 9, -100]]),
        "images": torch.zeros(1, 3, 4, 4),
        "image_sizes": [(4, 4)],
    }
    tokens = {(4, 4): 4}.__getitem__
    assert fl.batch_flops(trained, batch, tokens, None) == fl.training_flops(
        trained, [4 + 4, 4], 1, supervised=4
    )


def test_lora_base_is_input_grads_only_plus_the_adapters():
    adapters = 2 * (4 * 8 + 4 * 8)  # r = 4 on one 8 -> 8 linear in each of the 2 layers: A + B
    got = fl.training_flops(_model(lora_params=adapters, projector=True), LENGTHS, CROPS)
    base = (LLM_LINEAR + LLM_ATTENTION + LLM_HEAD) + (LLM_LINEAR + 2 * LLM_ATTENTION + LLM_HEAD)
    vision = (TOWER_LINEAR + TOWER_ATTENTION + TOWER_PATCH) + 2 * (PROJ_1 + PROJ_2) + PROJ_2
    assert got.model == base + 3 * 2 * adapters * 8 + vision


def test_trained_tower_backward_covers_the_selected_layers_only():
    got = fl.training_flops(_model(projector=True, tower=True), LENGTHS, CROPS)
    llm = (LLM_LINEAR + LLM_ATTENTION + LLM_HEAD) + (LLM_LINEAR + 2 * LLM_ATTENTION + LLM_HEAD)
    tower = (TOWER_LINEAR + TOWER_ATTENTION + TOWER_PATCH) + (2 * TOWER_LINEAR + 2 * TOWER_ATTENTION) / 2
    tower += TOWER_PATCH  # the patch embedding's weight gradient (no pixel gradient)
    projector = 3 * (PROJ_1 + PROJ_2)  # now the first linear passes the gradient on too
    assert got.model == llm + tower + projector


def test_recompute_and_the_blank_crop_count_in_hfu_only():
    trained = dict(
        llm=True, lm_head=True, projector=True, tower=True, checkpoint_llm=True, checkpoint_tower=True
    )
    plain = fl.training_flops(
        _model(**{k: v for k, v in trained.items() if "checkpoint" not in k}), LENGTHS, CROPS
    )
    got = fl.training_flops(_model(**trained), LENGTHS, CROPS)
    assert got.model == plain.model
    assert got.hardware == got.model + LLM_LINEAR + LLM_ATTENTION + (TOWER_LINEAR + TOWER_ATTENTION) / 2
    text_only = fl.training_flops(_model(projector=True), LENGTHS, 0, image_free=True)
    with_one_crop = fl.training_flops(_model(projector=True), LENGTHS, 1)
    no_crop = fl.training_flops(_model(projector=True), LENGTHS, 0)
    assert text_only.model == no_crop.model
    assert text_only.hardware == no_crop.model + (with_one_crop.model - no_crop.model)


def test_sample_lengths_of_unpacked_and_packed_rows():
    image = IMAGE_TOKEN_INDEX
    ids = torch.tensor([[5, image, 6, 7, 0, 0], [8, 9, 9, 9, 9, 9]])
    mask = ids.ne(0) | torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]).bool()
    batch = {"input_ids": ids, "attention_mask": mask, "image_sizes": [(10, 20)], "labels": ids}
    tokens = {(10, 20): 7, (30, 30): 11}.__getitem__
    assert fl.sample_lengths(batch, tokens) == [3 + 7, 6]
    assert fl.sample_lengths(batch, tokens, max_length=8) == [8, 6]  # the merge truncates the row
    packed = {
        "input_ids": torch.tensor([[image, 1, 2, 3, image, image, 4, 0]]),
        "seq_ids": torch.tensor([[1, 1, 2, 2, 2, 2, 2, 0]]),
        "image_sizes": [(10, 20), (30, 30), (10, 20)],
        "labels": torch.full((1, 8), IGNORE_INDEX),
    }
    assert fl.sample_lengths(packed, tokens) == [1 + 7, 3 + 11 + 7]
    packed["image_sizes"] = packed["image_sizes"][:2]
    with pytest.raises(ValueError, match="row 0 has more image placeholders"):
        fl.sample_lengths(packed, tokens)


def test_batch_crops_counts_anyres_crops():
    assert fl.batch_crops(None) == 0
    assert fl.batch_crops(torch.zeros(3, 3, 4, 4)) == 3
    assert fl.batch_crops([torch.zeros(5, 3, 4, 4), torch.zeros(1, 3, 4, 4)]) == 6


@pytest.mark.parametrize("stage", ["pretrain", "finetune", "finetune_lora"])
def test_flop_model_reads_the_built_model(tmp_path, stage):
    """Shapes from the configs (the matmul weights count the model's 2-D LLM weights), what trains from the
    stage, and the tower's feature layer."""
    from llava_train.config import to_typed
    from llava_train.train import steps
    from llava_train.train.stages import apply_stage, component_of

    data = make_colour_dataset(tmp_path / "d", n=8)
    cfg = to_typed(
        compose_config(
            [f"stage={stage}", "stage.pretrain_mm_mlp_adapter=null", *tiny_overrides(data, tmp_path)]
        )
    )
    tokenizer = steps.build_tokenizer(cfg)
    model = apply_stage(steps.build_model(cfg, tokenizer), cfg.stage)
    fm = fl.flop_model(model)
    llm_weights = sum(
        p.numel()
        for n, p in model.named_parameters()
        if component_of(n) in ("llm", "lm_head") and p.ndim == 2
    )
    assert fm.llm.params == llm_weights
    lora = sum(p.numel() for n, p in model.named_parameters() if component_of(n) == "lora")
    tr = fm.trainable
    assert (tr.llm, tr.lm_head, tr.lora_params, tr.projector, tr.tower) == (
        stage == "finetune",
        stage == "finetune",
        lora,
        True,
        False,
    )
    assert lora > 0 if stage == "finetune_lora" else lora == 0
    tower = fm.tower  # tiny CLIP: 2 layers, select_layer -2 -> hidden_states[1]
    assert (tower.layers, tower.backward_layers, tower.tokens) == (2, 1, 4 * 4 + 1)
    assert fm.projector_tokens == 4 * 4


def test_training_run_logs_and_writes_throughput(tmp_path):
    """Every logging step carries tokens_per_second / tflops / mfu / hfu; throughput.jsonl has one row a log,
    and its FLOPs add up to the Trainer's total_flos."""
    data = make_colour_dataset(tmp_path / "d", n=8)
    raw = compose_config(
        [
            "stage=finetune",
            "stage.pretrain_mm_mlp_adapter=null",
            *tiny_overrides(data, tmp_path / "run", max_steps=2, save_steps=100, logging_steps=1),
            "training.peak_tflops=0.5",
        ]
    )
    trainer, _, _ = run_steps(raw)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    rows = [json.loads(line) for line in (tmp_path / "run" / tp.THROUGHPUT_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [h["step"] for h in logs] == [1, 2]
    for row, log in zip(rows, logs):
        for key in ("tokens_per_second", "tflops", "mfu", "hfu"):
            assert row[key] == log[key] and row[key] > 0
        assert row["mfu"] == pytest.approx(row["tflops"] / 0.5) and row["hfu"] >= row["mfu"]
        assert row["peak_source"] == "config"
    achieved = sum(r["tflops"] * r["seconds"] * 1e12 for r in rows)
    assert achieved == pytest.approx(trainer.state.total_flos, rel=1e-3)
