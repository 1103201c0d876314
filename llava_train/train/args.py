"""The typed config mapped onto `transformers.TrainingArguments`: batch arithmetic (samples or token budgets),
precision, wandb, FSDP2 and DeepSpeed, and the world-size check that every launcher's processes share one model.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import TrainingArguments

from llava_train.config import (
    Config,
    FsdpConfig,
    Precision,
    deepspeed_config_path,
    gradient_accumulation_steps,
    token_accumulation_steps,
)

logger = logging.getLogger(__name__)


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_config(fsdp: FsdpConfig) -> dict:
    """TrainingArguments.fsdp_config (FSDP2) for the fsdp group; transformers 5 deprecates the string form
    ``fsdp="full_shard auto_wrap"`` LLaVA's scripts pass. full_shard reshards after forward, shard_grad_op
    keeps the parameters gathered; auto_wrap wraps ``transformer_layer_cls_to_wrap`` (the default policy)."""
    words = fsdp.sharding.split()
    reshard = {"full_shard": True, "shard_grad_op": False}
    strategy = [w for w in words if w in reshard]
    unknown = [w for w in words if w not in (*reshard, "auto_wrap", "offload")]
    if unknown or len(strategy) != 1:
        raise ValueError(
            f"fsdp.sharding={fsdp.sharding!r}: use one of full_shard / shard_grad_op, optionally with auto_wrap "
            "and offload (FSDP2; hybrid sharding needs transformers' FSDP1, not configured here)"
        )
    config = {
        "reshard_after_forward": reshard[strategy[0]],
        "transformer_layer_cls_to_wrap": list(fsdp.transformer_layer_cls_to_wrap),
        "activation_checkpointing": fsdp.activation_checkpointing,
    }
    if fsdp.cpu_offload or "offload" in words:
        config["cpu_offload"] = True
    return config


WANDB_MODES = ("offline", "online", "disabled", "dryrun", "run", "shared")  # what wandb itself accepts


def check_wandb_mode_env(default: str) -> None:
    """WANDB_MODE set but empty means unset (training.wandb_mode applies); another unknown value is refused here
    rather than as wandb's pydantic traceback at the first log."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        return
    if not mode.strip():
        os.environ["WANDB_MODE"] = default
        logger.warning("WANDB_MODE is set but empty: using training.wandb_mode=%s", default)
    elif mode not in WANDB_MODES:
        raise ValueError(
            f"WANDB_MODE={mode!r} in the environment is not one of {WANDB_MODES}: unset it "
            "(training.wandb_mode applies) or set e.g. WANDB_MODE=disabled."
        )


def build_training_args(cfg: Config, run_dir: str | None = None) -> TrainingArguments:
    """Map the typed config onto TrainingArguments; check world size and batch arithmetic."""
    t = cfg.training
    run_dir = run_dir or t.run_dir
    world = world_size_from_env()
    cuda = torch.cuda.is_available()
    if cfg.fsdp.enabled and not cuda:
        raise RuntimeError(
            "fsdp is GPU-only here: the Trainer cannot run FSDP on CPU. Use fsdp=none, and deepspeed=zero2 or "
            "deepspeed=zero3 for sharded training on CPU."
        )
    precision = Precision(t.precision)
    if precision == Precision.auto:
        precision = Precision.bf16 if cuda and torch.cuda.is_bf16_supported() else Precision.fp32
    if precision in (Precision.bf16, Precision.fp16) and not cuda:
        logger.warning("precision=%s on CPU: autocast is ~23x slower than fp32 here.", precision.value)
    budget = cfg.data.max_tokens_per_batch
    if budget is None:
        accumulation = gradient_accumulation_steps(t.global_batch_size, t.per_device_batch_size, world)
        per_device = t.per_device_batch_size
    else:  # the batch sampler sizes each micro-batch; the Trainer's batch size is its bookkeeping only
        accumulation, per_device = token_accumulation_steps(t.global_batch_tokens, budget, world), 1
    report_to = "none"
    if t.report_to_wandb:
        check_wandb_mode_env(t.wandb_mode.value)
    if t.report_to_wandb and os.environ.setdefault("WANDB_MODE", t.wandb_mode.value) != "disabled":
        report_to = "wandb"
        os.environ.setdefault("WANDB_PROJECT", t.wandb_project)
        os.environ.setdefault("WANDB_DIR", str(run_dir))
    fsdp_kwargs = {"fsdp": True, "fsdp_config": fsdp_config(cfg.fsdp)} if cfg.fsdp.enabled else {}
    args = TrainingArguments(
        output_dir=str(run_dir),
        run_name=t.name,
        seed=t.seed,
        data_seed=t.seed,  # the samplers' order follows training.seed (data.seed: mixture sampling only)
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio,  # < 1: a ratio of the total steps (Trainer 5.x)
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        bf16=precision == Precision.bf16,
        fp16=precision == Precision.fp16,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        dataloader_num_workers=cfg.data.num_workers,
        remove_unused_columns=False,  # the collator builds the model's kwargs itself
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation of complete checkpoints is ours (checkpoint.rotate_checkpoints)
        report_to=report_to,
        disable_tqdm=not t.progress_bar,
        use_cpu=not cuda,  # without it the Trainer on CPU ignores WORLD_SIZE: N processes, N separate models
        ddp_backend="gloo" if not cuda and world > 1 else None,
        deepspeed=deepspeed_config_path(cfg.deepspeed),
        average_tokens_across_devices=True,
        **fsdp_kwargs,
    )
    if args.world_size != world:
        raise RuntimeError(
            f"the launcher started WORLD_SIZE={world} processes but the Trainer sees world_size="
            f"{args.world_size}: each process would train its own model. On CPU the Trainer needs use_cpu=True "
            "and a process group backend (gloo); check the launcher's environment (RANK, LOCAL_RANK, MASTER_ADDR)."
        )
    return args
