"""Helpers shared by the training tests: a tiny synthetic LLaVA data set, Hydra composition, and a run of
the same steps launch/train.py runs (with optional extra Trainer callbacks)."""

from __future__ import annotations

import json
import random
import socket
import sys
from pathlib import Path

import torch.multiprocessing
from omegaconf import DictConfig
from PIL import Image
from transformers import TrainerCallback

from llava_train.config import compose_config, to_typed  # noqa: F401 (compose_config: for the tests)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
SIZES = [(56, 56), (112, 56), (56, 112), (80, 60)]


def make_colour_dataset(folder: Path, n: int = 48, seed: int = 0) -> Path:
    """n solid-colour images of a few sizes (anyres grids differ) with "what colour" Q/A; a few text-only."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name = rng.choice(list(COLOURS))
        if i % 8 == 7:  # text-only rows exercise the mixed-modality path
            conv = [{"from": "human", "value": f"Say {name}."}, {"from": "gpt", "value": f"{name}"}]
            records.append({"id": f"t{i}", "conversations": conv})
            continue
        Image.new("RGB", rng.choice(SIZES), COLOURS[name]).save(folder / f"img{i}.png")
        conv = [
            {"from": "human", "value": "<image>\nWhat colour is this image?"},
            {"from": "gpt", "value": f"The image is {name}."},
        ]
        records.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": conv})
    path = folder / "train.json"
    path.write_text(json.dumps(records))
    return path


def tiny_overrides(data_json: Path, run_dir: Path, **training) -> list[str]:
    """Small, fast CPU settings on the tiny model; `training` adds training.<key>=<value>."""
    base = {
        "global_batch_size": 4,
        "per_device_batch_size": 4,
        "gradient_checkpointing": "false",
        "max_steps": 8,
        "save_steps": 4,
        "logging_steps": 1,
        "progress_bar": "false",
        "lr_scheduler_type": "constant",
        "warmup_ratio": 0.0,
        "loss_plot": "false",
        "save_total_limit": 3,
    }
    base.update(training)
    return [
        f"data.data_path={data_json}",
        f"data.image_folder={data_json.parent}",
        f"training.run_dir={run_dir}",
        *(f"training.{k}={v}" for k, v in base.items()),
    ]


def lora_deepspeed_overrides(
    data_json: Path, run_dir: Path, zero: str, max_steps: int, *extra: str
) -> list[str]:
    """LoRA under DeepSpeed ``zero`` on two ranks: global batch 8 (2 ranks x 2 x accumulation 2), a checkpoint
    every 2 steps, all kept (the distributed fault and multi-node tests)."""
    return [
        "+stage=finetune_lora",
        f"deepspeed={zero}",
        "stage.pretrain_mm_mlp_adapter=null",
        "stage.lora.r=8",
        *tiny_overrides(
            data_json,
            run_dir,
            learning_rate=2e-3,
            max_steps=max_steps,
            save_steps=2,
            global_batch_size=8,
            save_total_limit=10,
        ),
        "training.per_device_batch_size=2",
        *extra,
    ]


class SharingProbe(torch.utils.data.Dataset):
    """Each item is the sharing strategy of the process that loads it: a loader worker's, with workers.
    Here, not in a test file, so that spawned workers can import it."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> str:
        return torch.multiprocessing.get_sharing_strategy()


def run_steps(raw: DictConfig, callbacks=(), before_train=None):
    """The steps of launch/train.py in the same order; returns (trainer, model, result)."""
    from llava_train.train import steps
    from llava_train.train.stages import apply_stage

    cfg = to_typed(raw)
    steps.setup_run(cfg, raw)
    tokenizer = steps.build_tokenizer(cfg)
    model = steps.build_model(cfg, tokenizer)
    model = apply_stage(model, cfg.stage)
    dataset, collator = steps.build_data(cfg, tokenizer, model)
    trainer = steps.build_trainer(cfg, model, tokenizer, dataset, collator)
    for cb in callbacks:
        trainer.add_callback(cb)
    if before_train is not None:
        before_train(model)
    result = steps.train(trainer, cfg)
    steps.save_final(trainer, cfg)
    return trainer, model, result


def logged_losses(trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


class CrashAt(TrainerCallback):
    """Raises at the end of training step ``step``: a crash mid-run, after any checkpoint of that step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int = 2) -> list[str]:
    """The command prefix of a local ``torchrun`` with ``nproc`` processes on a free port."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
    ]  # fmt: skip
