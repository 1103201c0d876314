"""The steps launch/train.py calls in order, each a small function of the typed config.

1 setup_run        seed, run dir, pre-flight checks (writable, not an earlier run's, model path, records
                   files parse), resolved config.yaml (rank 0)
2 build_tokenizer  llava_train.data.load_tokenizer(cfg.tokenizer)
3 build_model      llava_train.model.build_model(cfg.model, tokenizer) (+ run_dir/base_model: a random LLM
                   under LoRA; + liger's kernels when training.liger_kernel)
4 apply_stage      llava_train.train.stages.apply_stage(model, cfg.stage)
5 build_data       dataset + collator, with the model's image geometry (VisionSpec.from_model)
6 build_trainer    TrainingArguments + LlavaTrainer (+ the in-training eval callback of eval=vqa)
7 train            resume from the latest complete checkpoint when training.resume
8 save_final       stage weights into run_dir, loss_curve.png
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llava_train.config import Config, LlmTuning, StageName
from llava_train.train import checkpoint as ckpt
from llava_train.train import faults
from llava_train.train.args import build_training_args
from llava_train.train.plots import plot_loss_curve
from llava_train.train.trainer import LlavaTrainer

logger = logging.getLogger(__name__)

RANDOM_BASE_DIR = "base_model"  # run_dir/base_model: the random LLM a LoRA run started from (merge's base)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def setup_run(cfg: Config, raw: DictConfig) -> Path:
    """Seed everything, create the run dir, write the resolved config there (rank 0). Returns the run dir."""
    from transformers import set_seed

    if cfg.deepspeed.config_file:
        check_stale_extension_locks()
    set_seed(cfg.training.seed)
    run_dir = Path(cfg.training.run_dir)
    faults.check_writable(run_dir)  # now, not at the first save hours later
    check_model_paths(cfg)
    check_record_files(cfg)  # a malformed line fails now, not after the model is built
    if is_main_process():
        faults.check_run_dir_reuse(run_dir, cfg.training.resume, cfg.training.overwrite)
        OmegaConf.save(raw, run_dir / "config.yaml", resolve=True)
    logger.info("run dir %s (world size %s)", run_dir.resolve(), os.environ.get("WORLD_SIZE", "1"))
    return run_dir


def check_model_paths(cfg: Config) -> None:
    """model.llm_path is a local directory (nothing is downloaded): say so when it does not exist, instead of
    the hub client's "Repo id must be in the form ..." the tokenizer and from_pretrained would give."""
    path = cfg.model.llm_path
    if path is not None and not Path(path).is_dir():
        raise FileNotFoundError(
            f"model.llm_path={path!r} does not exist{' (it is a file)' if Path(path).exists() else ''}: it "
            "must be a local directory of a Llama-family checkpoint (config.json + weights); models are never "
            "downloaded. Fix the path, or model.llm_path=null for a random LLM of the preset's sizes."
        )


def save_random_base(cfg: Config, model: Any, tokenizer: Any) -> Path | None:
    """A LoRA run on a random LLM (model.llm_path=null) saves that base into run_dir/base_model before the
    stage is applied: merging the adapter needs the exact frozen weights, which nothing else holds. Rank 0."""
    if cfg.stage.tune_llm != "lora" or cfg.model.llm_path is not None or not is_main_process():
        return None
    out = Path(cfg.training.run_dir) / RANDOM_BASE_DIR
    if cfg.training.resume and (out / "config.json").is_file():
        return out  # the base this run started from; the rebuilt one is only equal while the seed is
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("random base LLM saved to %s: merge with op=merge model_dir=%s", out, out)
    return out


def log_bad_record_totals(trainer: LlavaTrainer, cfg: Config) -> dict[str, int]:
    """The end-of-run totals of what data.bad_record_policy=skip skipped or truncated (as checkpointed)."""
    totals = dict(trainer.bad_record_counts)
    if cfg.data.bad_record_policy == "skip" or totals:
        logger.warning(
            "bad records in this run: %s. A bad record is counted each time the sampler draws it (once per "
            "epoch), a malformed line once; per checkpoint in %s.",
            totals or "none",
            faults.FAULT_STATE_FILE,
        )
    return totals


def check_record_files(cfg: Config) -> None:
    """Open the training records once (every line parsed): a non-UTF-8 or malformed JSON / JSONL line is an
    error naming file, line and column (skipped and counted under data.bad_record_policy=skip). A .json file's
    parse is cached, so build_data reopens it as JSONL."""
    from llava_train.data.mixture import mixture_source
    from llava_train.data.sources import file_source

    d = cfg.data
    path = Path(d.data_path)
    if not path.is_file():  # missing: build_data says so; a directory is an HF dataset
        return
    if path.suffix.lower() in (".yaml", ".yml"):
        mixture_source(str(path), d.image_folder, d.seed, d.cache_dir, d.bad_record_policy)
    elif path.suffix.lower() in (".json", ".jsonl"):
        file_source(path, d.image_folder, d.cache_dir, d.bad_record_policy)


def check_stale_extension_locks(max_age_s: float = 600.0) -> None:
    """DeepSpeed JIT-builds its comm op under torch's extension cache, guarded by a `lock` file. A build that
    was killed leaves the lock behind and every later run waits on it forever: refuse, and say how to fix it."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    now = time.time()
    stale = [p for p in root.glob("*/*/lock") if now - p.stat().st_mtime > max_age_s]
    if stale:
        raise RuntimeError(
            f"stale torch-extension build lock(s) {[str(p) for p in stale]} (older than {max_age_s:.0f} s: a "
            "killed DeepSpeed JIT build). The run would hang waiting for it. If no build is running, remove it: "
            f"rm {' '.join(str(p) for p in stale)}"
        )


def build_tokenizer(cfg: Config) -> Any:
    from llava_train.data.tokenizers import load_tokenizer

    return load_tokenizer(cfg.tokenizer)


def build_model(cfg: Config, tokenizer: Any) -> Any:
    """The model of ``cfg.model``. Under ZeRO-3 it is built sharded (deepspeed.zero.Init): each rank holds
    its part of the LLM from the start instead of a full copy, as the original's from_pretrained did."""
    from llava_train.model import build_model as _build

    if cfg.training.liger_kernel:  # before building: no CUDA, no liger-kernel or ZeRO-3 fails now
        from llava_train.model.liger import check_liger

        check_liger(zero3=is_zero3(cfg))
    # TrainingArguments with a ZeRO-3 config set transformers' ZeRO-3 flag while they live: from_pretrained
    # and _from_config then build under zero.Init. The Trainer gets its own arguments later.
    zero3_flag = build_training_args(cfg) if is_zero3(cfg) else None
    if zero3_flag is not None:  # zero.Init shards over DeepSpeed's process group: set it up now
        import deepspeed
        import torch.distributed as dist

        _ = zero3_flag.device  # the Trainer's device and torch.distributed setup
        deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else None)
    model = _build(cfg.model, tokenizer)
    del zero3_flag
    if cfg.training.liger_kernel:
        from llava_train.model.families import family_of
        from llava_train.model.liger import apply_liger

        apply_liger(model, family_of(model.config))
        logger.info(
            "liger kernels on the %s decoder, liger's fused linear cross-entropy", family_of(model.config)
        )
    if not is_zero3(cfg):  # a sharded random base cannot be saved whole here (docs/RELIABILITY.md)
        save_random_base(cfg, model, tokenizer)
    model.config.use_cache = False  # no KV cache while training (and required by gradient checkpointing)
    return model


def is_zero3(cfg: Config) -> bool:
    from llava_train.config import deepspeed_config_path

    path = deepspeed_config_path(cfg.deepspeed)
    if path is None:
        return False
    return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0)) == 3


def build_data(cfg: Config, tokenizer: Any, model: Any) -> tuple[Any, Any]:
    """(train dataset, collator). The image geometry, the maximum length and the image processor come
    from the built model (data.image_aspect_ratio may ask for one crop per image on an anyres model)."""
    from llava_train.data.collator import DataCollator
    from llava_train.data.config import VisionSpec
    from llava_train.data.dataset import build_dataset

    if cfg.data.num_workers > 0:  # forked workers inherit it; they send, this process receives
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy(cfg.data.worker_sharing)
    base = _base_model(model)
    vision = VisionSpec.from_model(base).with_aspect_ratio(cfg.data.image_aspect_ratio)
    processor = base.get_vision_tower().image_processor()
    dataset = build_dataset(cfg.data, tokenizer, processor, vision)
    logger.info("train data: %d records from %s", len(dataset), cfg.data.data_path)
    if cfg.data.packing:
        from llava_train.data.packing import PackingCollator, build_packed_dataset

        dataset = build_packed_dataset(  # exact lengths over the loader's workers (0.8 ms a record on one)
            dataset,
            vision.model_max_length,
            by_modality=cfg.data.group_by_modality_length,
            num_workers=cfg.data.num_workers,
        )
        if getattr(base.config, "_attn_implementation", None) == "sdpa":
            logger.info(
                "data.packing under sdpa masks each row with a [T, T] block-diagonal mask; "
                "model.attn_implementation=sdpa_varlen trains the same rows without it, with the same loss "
                "(benchmarks/RESULTS.md section 2)"
            )
        return dataset, PackingCollator(tokenizer, max_length=vision.model_max_length)
    return dataset, DataCollator(tokenizer, padding_side=base.config.tokenizer_padding_side or "right")


def build_trainer(cfg: Config, model: Any, tokenizer: Any, dataset: Any, collator: Any) -> LlavaTrainer:
    args = build_training_args(cfg)
    if cfg.training.gradient_checkpointing:
        # Frozen embeddings give the first checkpointed block no input that requires grad.
        model.enable_input_require_grads()
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        llava_cfg=cfg,
    )
    if cfg.eval.enabled:  # held-out generation every eval.eval_steps, logged through the Trainer
        from llava_train.eval.in_training import build_in_training_eval

        trainer.add_callback(build_in_training_eval(cfg, model, tokenizer, log_fn=trainer.log))
    return trainer


def train(trainer: LlavaTrainer, cfg: Config) -> Any:
    """trainer.train(), resuming from the latest complete checkpoint when training.resume is set."""
    resume = None
    if cfg.training.resume:
        resume = resume_checkpoint(cfg.training.run_dir)
    if cfg.training.check_disk_space:
        check_disk_space(trainer, cfg)
    return trainer.train(resume_from_checkpoint=str(resume) if resume else None)


def resume_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint training.resume=true continues from: the newest complete one. A run dir with no
    checkpoint at all starts fresh (the first launch of a job that always passes resume=true); one with only
    partial checkpoints is an error naming them, since starting over there would throw their steps away."""
    complete, partial = ckpt.checkpoints(run_dir)
    if complete:
        resume = ckpt.latest_complete_checkpoint(run_dir)
        logger.info("resuming from %s", resume)
        return resume
    if partial:
        why = "; ".join(f"{p.name}: {', '.join(ckpt.checkpoint_problems(p))}" for p in partial)
        raise FileNotFoundError(
            f"training.resume=true but {run_dir} has no complete checkpoint, only partial ones ({why}). "
            "Nothing can be resumed: start over with training.resume=false training.overwrite=true "
            "(deletes them)."
        )
    logger.warning("training.resume=true but %s has no checkpoint yet: starting from step 0", run_dir)
    return None


def check_disk_space(trainer: LlavaTrainer, cfg: Config) -> None:
    """Fail before training when run_dir's disk cannot hold one more checkpoint."""
    full = cfg.stage.tune_llm is LlmTuning.full
    needed = faults.estimate_checkpoint_bytes(
        trainer.model, trainer.processing_class, full_model=full, deepspeed=bool(cfg.deepspeed.config_file)
    )
    trainer.checkpoint_estimate = needed  # for the message if a save still runs out of space
    faults.check_free_space(cfg.training.run_dir, needed)
    logger.info(
        "one checkpoint needs about %.1f MiB: enough free space in %s", needed / 2**20, cfg.training.run_dir
    )


def save_final(trainer: LlavaTrainer, cfg: Config) -> Path:
    """Stage weights into run_dir (mm_projector.safetensors / adapter + non-LoRA / full model), loss curve
    (with the in-training eval scores marked)."""
    run_dir = Path(cfg.training.run_dir)
    trainer.save_model(str(run_dir))  # collective under ZeRO-3: every rank calls it
    if trainer.args.should_save:
        log_bad_record_totals(trainer, cfg)
        if cfg.training.loss_plot:
            plot_loss_curve(trainer.state.log_history, run_dir / "loss_curve.png")
        logger.info("saved %s weights to %s", StageName(cfg.stage.name).value, run_dir)
    return run_dir


def _base_model(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if get_base else model
