"""Token-budget micro-batches (data.max_tokens_per_batch): the batch sampler covers every row once per epoch
within the budget, the global batch can be given in tokens, and accumulated variable-size micro-batches give
one big batch's gradient (the loss is normalised by supervised tokens across accumulation)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from train_utils import compose_config, make_colour_dataset, tiny_overrides
from transformers import TrainerCallback, set_seed

from llava_train.config import to_typed, token_accumulation_steps
from llava_train.data.sampler import TokenBudgetBatchSampler
from llava_train.train import steps
from llava_train.train.stages import apply_stage
from llava_train.train.trainer import count_supervised_tokens

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(5, 100) for _ in range(200)]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 3)])
def test_every_row_once_per_epoch_within_the_budget(world, accum):
    sampler = TokenBudgetBatchSampler(LENGTHS, max_tokens=256, world_size=world, grad_accum=accum, seed=3)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) and len(batches) % (world * accum) == 0
        assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
        assert all(len(b) * max(LENGTHS[i] for i in b) <= 256 for b in batches)
        epochs.append(batches)
    assert epochs[0] != epochs[1]  # reshuffled, same count
    sizes = [len(b) for b in epochs[0]]
    assert min(sizes) < max(sizes)  # short rows share a micro-batch, long ones do not


def test_micro_batches_are_single_modality_with_modality_grouping():
    signed = [n if i % 3 else -n for i, n in enumerate(LENGTHS)]  # every third row text-only
    batches = list(TokenBudgetBatchSampler(signed, max_tokens=256, by_modality=True))
    assert all(len({signed[i] > 0 for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))


def test_a_row_over_the_budget_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"first: pack \[4, 7\], 300 tokens.*at least the model's maximum"):
        TokenBudgetBatchSampler([10, 300], max_tokens=256, names=["[1]", "pack [4, 7]"])
    with pytest.raises(ValueError, match="cannot make a multiple of world_size x gradient accumulation"):
        TokenBudgetBatchSampler([10, 20], max_tokens=256, world_size=2, grad_accum=2)


def test_global_batch_tokens_sets_accumulation_and_needs_a_budget(tmp_path):
    assert token_accumulation_steps(None, 512, 4) == 1
    assert token_accumulation_steps(4096, 512, 2) == 4
    with pytest.raises(ValueError, match="not a multiple of data.max_tokens_per_batch=512 x world_size=2"):
        token_accumulation_steps(1536, 512, 2)
    data = make_colour_dataset(tmp_path / "d", n=4)
    raw = compose_config(
        ["stage=pretrain", *tiny_overrides(data, tmp_path), "training.global_batch_tokens=1024"]
    )
    with pytest.raises(ValueError, match="global_batch_tokens needs token-budget micro-batches"):
        to_typed(raw)
    raw = compose_config(["stage=pretrain", *tiny_overrides(data, tmp_path), "data.max_tokens_per_batch=0"])
    with pytest.raises(ValueError, match=r"data.max_tokens_per_batch=0 \(must be > 0, or null\)"):
        to_typed(raw)


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
def test_accumulated_budget_batches_give_one_big_batch_gradient(tmp_path, packing):
    """One optimizer step of 2 accumulated token-budget micro-batches (different sizes and supervised-token
    counts) has the gradient of one batch of the same samples, whose loss is the mean over all their tokens."""
    data = _varied_answers(make_colour_dataset(tmp_path / "d", n=24))
    overrides = [
        "stage=finetune",
        "stage.pretrain_mm_mlp_adapter=null",
        *tiny_overrides(data, tmp_path / "run", max_steps=1, save_steps=100, max_grad_norm=0),
        "data.max_tokens_per_batch=400",
        "training.global_batch_tokens=800",
        "data.num_workers=0",  # the collator runs here, so the micro-batches' samples can be recorded
        f"data.packing={str(packing).lower()}",
        "model.model_max_length=200",  # packed rows of <= 200 tokens, two of them fit the budget
    ]
    cfg = to_typed(compose_config(overrides))
    steps.setup_run(cfg, compose_config(overrides))
    tokenizer = steps.build_tokenizer(cfg)
    model = apply_stage(steps.build_model(cfg, tokenizer), cfg.stage)
    dataset, collator = steps.build_data(cfg, tokenizer, model)
    seen: list[list[dict]] = []

    def recording(rows):
        seen.append([s for r in rows for s in (r if isinstance(r, list) else [r])])
        return collator(rows)

    trainer = steps.build_trainer(cfg, model, tokenizer, dataset, recording)
    capture = GradCapture()
    trainer.add_callback(capture)
    steps.train(trainer, cfg)
    assert trainer.args.gradient_accumulation_steps == 2
    seen = seen[:2]  # the step's two micro-batches (accelerate's loader collates one ahead)
    counts = [int(count_supervised_tokens(b["labels"], b["attention_mask"])) for b in map(_plain, seen)]
    assert counts[0] != counts[1], "equal micro-batches cannot tell a token mean from a mean of means"

    set_seed(cfg.training.seed)  # the same initial weights, as setup_run seeded them
    reference = apply_stage(steps.build_model(cfg, tokenizer), cfg.stage).train()
    batch = _plain([s for micro in seen for s in micro])
    batch.pop("sample_ids")
    reference(**batch).loss.backward()  # mean CE over every supervised token of the step
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == capture.grads.keys() and grads
    for n, g in grads.items():
        torch.testing.assert_close(capture.grads[n], g, rtol=1e-4, atol=1e-7, msg=f"gradient of {n} differs")


def _varied_answers(path):
    """The colour records with answers of 1..6 sentences: micro-batches then differ in supervised tokens."""
    records = json.loads(path.read_text())
    for i, r in enumerate(records):
        r["conversations"][1]["value"] += " It really is." * (i % 6)
    path.write_text(json.dumps(records))
    return path


def _plain(samples: list[dict]) -> dict:
    from llava_train.data.collator import DataCollator

    return DataCollator(0)(samples)
