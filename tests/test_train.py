"""End-to-end training on the tiny model (CPU, fp32): stages lower the loss, frozen weights stay bit-identical,
checkpoints resume to the same losses, gradient accumulation matches one big batch, the launcher runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_utils import (
    CrashAt,
    compose_config,
    logged_losses,
    make_colour_dataset,
    run_steps,
    tiny_overrides,
)
from transformers import TrainerCallback

from llava_train.config import to_typed
from llava_train.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_json(tmp_path_factory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=48)


class Snapshot:
    """Parameters (frozen and trainable) right before trainer.train()."""

    def __call__(self, model):
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        self.trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _check_trained(model, snap: Snapshot, trainer, drop: float):
    for n, p in model.named_parameters():
        if n in snap.frozen:
            assert torch.equal(p.detach(), snap.frozen[n]), f"frozen parameter {n} changed"
    changed = [
        n
        for n, p in model.named_parameters()
        if n in snap.trainable and not torch.equal(p, snap.trainable[n])
    ]
    assert changed, "no trainable parameter changed"
    losses = list(logged_losses(trainer).values())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - drop, f"loss did not fall: {losses}"
    return losses


@pytest.fixture(scope="module")
def pretrained(data_json, tmp_path_factory):
    """Stage 1 on the tiny model (the random tiny tower trains too, as in the demo)."""
    run_dir = tmp_path_factory.mktemp("pretrain")
    raw = compose_config(
        [
            "+stage=pretrain",
            "stage.tune_vision_tower=true",
            *tiny_overrides(data_json, run_dir, learning_rate=1e-2, mm_vision_tower_lr=1e-3, max_steps=10),
        ]
    )
    snap = Snapshot()
    trainer, model, _ = run_steps(raw, before_train=snap)
    losses = _check_trained(model, snap, trainer, drop=0.3)
    return run_dir, losses


def test_pretrain_trains_projector_and_saves_it(pretrained):
    run_dir, losses = pretrained
    print("pretrain losses", [round(x, 3) for x in losses])
    weights = load_file(str(run_dir / "mm_projector.safetensors"))
    assert all(k.startswith(("model.mm_projector.", "model.image_newline")) for k in weights)
    assert {"model.mm_projector.0.weight", "model.mm_projector.2.weight"} <= set(weights)
    assert (run_dir / "vision_tower.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file()
    complete, partial = ckpt.checkpoints(run_dir)
    assert "checkpoint-8" in [p.name for p in complete] and not partial


@pytest.mark.parametrize("stage,lr", [("finetune_lora", 2e-3), ("finetune", 1e-3)])
def test_stage2_after_pretrain_lowers_loss(pretrained, data_json, tmp_path, stage, lr):
    projector = pretrained[0] / "mm_projector.safetensors"
    raw = compose_config(
        [
            f"+stage={stage}",
            f"stage.pretrain_mm_mlp_adapter={projector}",
            "stage.lora.r=8",
            "stage.lora.alpha=16",
            *tiny_overrides(data_json, tmp_path, learning_rate=lr, mm_projector_lr=lr / 2),
        ]
    )
    snap = Snapshot()
    trainer, model, _ = run_steps(raw, before_train=snap)
    losses = _check_trained(model, snap, trainer, drop=0.3)
    print(stage, "losses", [round(x, 3) for x in losses])
    # The stage-1 projector was loaded (not a random one): its pre-training values are the saved ones.
    saved = load_file(str(projector))
    names = {n.removeprefix("base_model.model."): n for n in snap.trainable}
    assert torch.equal(
        snap.trainable[names["model.mm_projector.0.weight"]].cpu(), saved["model.mm_projector.0.weight"]
    )
    if stage == "finetune_lora":
        assert {"adapter_model.safetensors", "adapter_config.json", "non_lora_trainables.safetensors"} <= {
            p.name for p in (tmp_path / "checkpoint-4").iterdir()
        }
        non_lora = load_file(str(tmp_path / "non_lora_trainables.safetensors"))
        assert "model.mm_projector.0.weight" in non_lora and not any("lora_" in k for k in non_lora)
        adapter = load_file(str(tmp_path / "adapter_model.safetensors"))
        assert adapter and all("lora_" in k and ".layers." in k and "vision" not in k for k in adapter)
    else:
        full = load_file(str(tmp_path / "model.safetensors"))
        assert "model.mm_projector.0.weight" in full and "lm_head.weight" in full


@pytest.mark.parametrize("stage", ["pretrain", "finetune_lora", "finetune"])
def test_resume_reaches_the_same_losses(data_json, tmp_path, stage):
    def overrides(run_dir, **kw):
        return [
            f"+stage={stage}",
            "stage.pretrain_mm_mlp_adapter=null",
            "stage.lora.r=8",
            *tiny_overrides(data_json, run_dir, learning_rate=1e-3, max_steps=4, save_steps=2, **kw),
            "data.group_by_modality_length=true",
        ]

    full, _, _ = run_steps(compose_config(overrides(tmp_path / "full")))
    with pytest.raises(KeyboardInterrupt):
        run_steps(compose_config(overrides(tmp_path / "cut")), callbacks=[CrashAt(3)])
    # A save interrupted half-way: no completion marker, must be ignored.
    (tmp_path / "cut" / "checkpoint-3").mkdir()
    (tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").write_text("{")
    assert ckpt.latest_complete_checkpoint(tmp_path / "cut").name == "checkpoint-2"
    resumed, _, result = run_steps(compose_config(overrides(tmp_path / "cut", resume="true")))
    a, b = logged_losses(full), logged_losses(resumed)
    # Steps 1-2 come back from checkpoint-2's trainer state; 3-4 are trained again after the resume.
    assert sorted(b) == [1, 2, 3, 4], b
    for step in (1, 2, 3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def no_tf32():
    """On a GPU the Trainer trains there; cuDNN's default TF32 convolutions (the vision tower's patch embedding)
    round to 10 mantissa bits, differently for batches of 2 and 8. Off, so the comparison is at fp32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_grad_accumulation_matches_one_big_batch(data_json, tmp_path, no_tf32):
    """4 micro-batches of 2 == 1 batch of 8: the loss is normalised by supervised tokens across accumulation."""
    grads = {}
    for per_device in (8, 2):
        raw = compose_config(
            [
                "+stage=finetune",
                "stage.pretrain_mm_mlp_adapter=null",
                "data.group_by_modality_length=false",  # mixed text-only / image batches: token counts differ
                *tiny_overrides(
                    data_json, tmp_path / str(per_device), max_steps=1, save_steps=100, global_batch_size=8
                ),
                f"training.per_device_batch_size={per_device}",
                "training.max_grad_norm=0",
            ]
        )
        cap = GradCapture()
        trainer, _, _ = run_steps(raw, callbacks=[cap])
        assert trainer.args.gradient_accumulation_steps == 8 // per_device
        grads[per_device] = cap.grads
    assert grads[8].keys() == grads[2].keys() and grads[8]
    for n, g in grads[8].items():
        torch.testing.assert_close(grads[2][n], g, rtol=1e-4, atol=1e-7, msg=f"gradient of {n} differs")


def test_supervised_token_count_equals_model_ce_count(data_json, tmp_path):
    """The trainer's count is the number of tokens the model's shifted CE averages over."""
    from llava_train.config import to_typed
    from llava_train.train import steps
    from llava_train.train.trainer import count_supervised_tokens

    cfg = to_typed(
        compose_config(
            ["+stage=finetune", "stage.pretrain_mm_mlp_adapter=null", *tiny_overrides(data_json, tmp_path)]
        )
    )
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer).eval()
    dataset, collator = steps.build_data(cfg, tokenizer, model)
    batch = collator([dataset[i] for i in (0, 1, 7, 9)])  # image rows and a text-only row
    batch.pop("sample_ids")
    n = count_supervised_tokens(batch["labels"], batch["attention_mask"])
    with torch.no_grad():
        mean = model(**batch).loss
        summed = model(**batch, num_items_in_batch=n).loss
    torch.testing.assert_close(summed, mean)


def test_launcher_runs_under_plain_python_with_plus_stage_and_local_rank(data_json, tmp_path):
    """`python launch/train.py +stage=pretrain --local_rank=0 ...` (the deepspeed launcher's extra arg)."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "+stage=pretrain",
        "--local_rank=0",
        *tiny_overrides(data_json, run_dir, max_steps=2, save_steps=2, loss_plot="true"),
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("config.yaml", "mm_projector.safetensors", "loss_curve.png", "checkpoint-2/COMPLETE"):
        assert (run_dir / name).is_file(), name
    assert "8/8 saved" in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()  # Hydra wrote nothing into the cwd


def test_the_data_side_takes_its_image_geometry_from_the_model(data_json, tmp_path):
    """One owner: the model's pinpoints, merge and length reach the dataset; data may only ask for pad."""
    from llava_train.data.config import VisionSpec
    from llava_train.train import steps

    with pytest.raises(ValueError, match="Unknown config keys.*data.image_grid_pinpoints"):
        to_typed(compose_config(["+stage=pretrain", *tiny_overrides(data_json, tmp_path),
                                 "+data.image_grid_pinpoints='[[56,56],[112,56]]'"]))  # fmt: skip
    cfg = to_typed(compose_config(["+stage=pretrain", *tiny_overrides(data_json, tmp_path),
                                   "model.model_max_length=300"]))  # fmt: skip
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    dataset, _ = steps.build_data(cfg, tokenizer, model)
    assert dataset.vision == VisionSpec.from_model(model)
    assert dataset.vision.image_aspect_ratio == "anyres" and dataset.vision.model_max_length == 300
    assert list(dataset.vision.image_grid_pinpoints) == [tuple(p) for p in model.config.image_grid_pinpoints]
    cfg.data.image_aspect_ratio = "pad"  # LLaVA-1.6's stage 1: one crop per image on an anyres model
    assert steps.build_data(cfg, tokenizer, model)[0].vision.image_aspect_ratio == "pad"
    model.config.image_aspect_ratio = "pad"
    cfg.data.image_aspect_ratio = "anyres"
    with pytest.raises(ValueError, match="leave data.image_aspect_ratio unset"):
        steps.build_data(cfg, tokenizer, model)


def test_training_seed_orders_the_data_not_data_seed(data_json, tmp_path):
    """The train sampler (grouped here) and the Trainer's data_seed follow training.seed; data.seed seeds the
    mixture sampling only, so it leaves the order alone."""
    from llava_train.data.sampler import build_sampler
    from llava_train.train import steps

    orders = {}
    for seed, data_seed in ((1, 5), (1, 6), (2, 5)):
        overrides = [
            "+stage=pretrain",
            *tiny_overrides(data_json, tmp_path / f"{seed}-{data_seed}", seed=seed),
            f"data.seed={data_seed}",
            "data.group_by_modality_length=true",
        ]
        cfg = to_typed(compose_config(overrides))
        tokenizer = steps.build_tokenizer(cfg)
        model = steps.build_model(cfg, tokenizer)
        dataset, collator = steps.build_data(cfg, tokenizer, model)
        trainer = steps.build_trainer(cfg, model, tokenizer, dataset, collator)
        assert trainer.args.seed == trainer.args.data_seed == seed
        orders[seed, data_seed] = list(trainer._get_train_sampler())
        expected = build_sampler(
            dataset, batch_size=4, world_size=1, grad_accum=1, seed=seed, by_modality=True
        )
        assert orders[seed, data_seed] == list(expected)
    assert orders[1, 5] == orders[1, 6] != orders[2, 5]
