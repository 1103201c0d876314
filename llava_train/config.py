"""One typed config tree for training, validated when it is loaded.

Hydra composes `conf/config.yaml` and its groups (stage/ model/ data/ deepspeed/ fsdp/ eval/) on top of the
`Config` dataclass registered here as `llava_train_schema`. Every node is a dataclass, so an unknown key or a
value of the wrong type fails at start-up (OmegaConf `ValidationError` / Hydra `ConfigCompositionException`,
both naming the full key), never three hours into a run. The model package owns `ModelConfig` and the data
package owns `DataConfig`; this module owns the stage, training, distributed and eval nodes and glues them.

Choices are Enums: a wrong choice (`stage=finetuen`, `training.precision=bf61`) lists the valid values.
Defaults live in the dataclasses; the stage presets in conf/stage/*.yaml hold LLaVA-1.5's hyperparameters.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from llava_train.data.config import DataConfig
from llava_train.model.builder import ModelConfig

# conf/ sits next to the package in the repository (the project is installed editable).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Config groups selected in conf/config.yaml's defaults list (each has a `null`/default entry there).
CONFIG_GROUPS = ("model", "data", "deepspeed", "fsdp", "eval", "stage")


class StageName(str, Enum):
    pretrain = "pretrain"  # stage 1: projector only (feature alignment)
    finetune = "finetune"  # stage 2: LLM + projector
    finetune_lora = "finetune_lora"  # stage 2 with LoRA on the LLM's linear layers


class LlmTuning(str, Enum):
    """How a stage trains the LLM; what it saves follows from it (train/checkpoint.py)."""

    frozen = "frozen"  # only the projector (and optionally the tower): mm_projector.safetensors
    full = "full"  # every LLM weight: a full model
    lora = "lora"  # LoRA adapters on the LLM: adapter + non_lora_trainables.safetensors


_LLM_TUNING = {
    StageName.pretrain: LlmTuning.frozen,
    StageName.finetune: LlmTuning.full,
    StageName.finetune_lora: LlmTuning.lora,
}


class Precision(str, Enum):
    auto = "auto"  # bf16 on a CUDA GPU that supports it, else fp32 (bf16 autocast on CPU is ~23x slower)
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class WandbMode(str, Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class LoraConfig:
    """peft LoRA on the LLM's decoder layers only (never the vision tower, the projector or lm_head)."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # Module names, matched only under `layers_regex` (the CLIP tower also has q_proj/k_proj/v_proj).
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    layers_regex: str = r"model\.layers\.\d+\.(self_attn|mlp)"
    bias: str = "none"
    # Also train the LLM's input embeddings and lm_head in full (saved with the non-LoRA trainables): for a
    # randomly initialised LLM (the demo's tiny one) whose frozen random vocab rows LoRA cannot move.
    train_embeddings: bool = False
    # QLoRA: 4-bit NF4 base weights through bitsandbytes; needs a CUDA GPU (refused on CPU).
    qlora: bool = False


@dataclass
class StageConfig:
    """What trains in a stage. Applied by `llava_train.train.stages.apply_stage` in one place."""

    name: StageName = MISSING
    tune_projector: bool = True
    # LLaVA keeps CLIP frozen (LLaVA-1.6 tunes it at lr 2e-6); a random tower that must learn sets it true.
    tune_vision_tower: bool = False
    # Stage-1 projector weights for stage 2: an explicit file (mm_projector.safetensors / .bin), never guessed.
    # Mandatory in every stage YAML (null = start from the random init on purpose).
    pretrain_mm_mlp_adapter: str | None = MISSING
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def tune_llm(self) -> LlmTuning:
        """frozen / full / lora: the one place a stage's name decides what trains and what is saved."""
        return _LLM_TUNING[StageName(self.name)]


@dataclass
class TrainingConfig:
    """Optimizer, schedule, batch, logging, checkpointing. Mapped onto transformers.TrainingArguments."""

    name: str = "llava"
    # Same on every rank (no timestamps): Hydra's run dir and the Trainer's output_dir.
    run_dir: str = "runs/${training.name}"
    seed: int = 42
    # Continue from the latest COMPLETE checkpoint under run_dir (partial ones are reported and skipped).
    resume: bool = False
    # Train into a run_dir that holds an earlier run (its config.yaml, checkpoints) from scratch, deleting its
    # checkpoints. Without it (or resume) such a run_dir is refused.
    overwrite: bool = False

    learning_rate: float = 2e-5
    mm_projector_lr: float | None = None
    mm_vision_tower_lr: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_ratio: float = 0.03

    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    # The setting; gradient accumulation = global / (per_device * world_size), must divide exactly.
    global_batch_size: int = 128
    per_device_batch_size: int = 16
    # With data.max_tokens_per_batch: the global batch in tokens (budget x world x accumulation, exactly);
    # None = one micro-batch per rank and step. global/per-device batch sizes are then unused.
    global_batch_tokens: int | None = None
    precision: Precision = Precision.auto
    gradient_checkpointing: bool = False
    # Sampler grouping and loader workers are data.group_by_modality_length / data.num_workers.

    logging_steps: int = 1
    # The MFU / HFU denominator per device, TFLOP/s. None: a known GPU's dense bf16/fp16 peak, else a matmul
    # rate measured at train start (docs/THROUGHPUT.md).
    peak_tflops: float | None = None
    save_steps: int = 500
    save_total_limit: int | None = 2
    progress_bar: bool = True
    report_to_wandb: bool = True
    wandb_mode: WandbMode = WandbMode.offline  # WANDB_MODE in the environment wins (tests set `disabled`)
    wandb_project: str = "llava-train"
    loss_plot: bool = True  # loss_curve.png in run_dir at the end
    # Fault tolerance (docs/RELIABILITY.md). A NaN / inf loss or gradient norm skips the optimizer update;
    # this many such steps in a row stop the run (a diverged run, or a batch of broken records).
    max_nonfinite_steps: int = 5
    # Before training: fail when run_dir's disk cannot hold one more checkpoint (weights + optimizer state).
    check_disk_space: bool = True
    # liger-kernel's fused RMSNorm / RoPE / SwiGLU and fused linear cross-entropy (GPU, the `liger` extra;
    # llava_train/model/liger.py). The loss and gradients equal the plain path's (tests/test_gpu.py).
    liger_kernel: bool = False


@dataclass
class DeepSpeedConfig:
    name: str = "none"
    # JSON file; a relative path is resolved against conf/deepspeed/. None: no DeepSpeed.
    config_file: str | None = None


@dataclass
class FsdpConfig:
    """PyTorch FSDP through the Trainer (GPU only; the Trainer cannot run FSDP on CPU)."""

    enabled: bool = False
    sharding: str = "full_shard auto_wrap"
    transformer_layer_cls_to_wrap: list[str] = field(default_factory=lambda: ["LlamaDecoderLayer"])
    cpu_offload: bool = False
    activation_checkpointing: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation during training (llava_train/eval/in_training.py): every ``eval_steps`` steps,
    batched greedy answers to the question jsonl ``data_path``, scored against ``ground_truth``."""

    enabled: bool = False
    data_path: str | None = None
    ground_truth: str | None = None
    image_folder: str | None = None  # None: data.image_folder
    metric: str = (
        "auto"  # as launch/eval.py: auto | vqa | textvqa | exact | yesno | mc | pope | mme | scienceqa
    )
    eval_steps: int = 500
    per_device_batch_size: int = 8
    max_new_tokens: int = 64


@dataclass
class Config:
    # The LLM's tokenizer: "mistral" / "smollm2" (offline assets) or a local directory; set by model/*.yaml.
    tokenizer: str = "mistral"
    # Paths every model / data YAML must state (null for "none"): "???" in the schema makes them mandatory,
    # so a `???` placeholder in a YAML stays missing until the command line fills it.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(llm_path=MISSING, vision_tower=MISSING))
    data: DataConfig = field(default_factory=lambda: DataConfig(data_path=MISSING, image_folder=MISSING))
    stage: StageConfig = field(default_factory=StageConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _checkpoint(name: str) -> Callable[[], str]:
    """The directory llava_train.pretrained's ``<name>_checkpoint()`` converts to (imported when called)."""
    return lambda: str(getattr(importlib.import_module("llava_train.pretrained"), f"{name}_checkpoint")())


# `${llava_pretrained:NAME}` in a YAML: the local directory of a converted pretrained checkpoint. Resolved
# (and converted on first use, cached) only when the value is read.
PRETRAINED = {name: _checkpoint(name) for name in ("smollm2_135m", "gemma3_270m")}


def _resolve_pretrained(name: str) -> str:
    if name not in PRETRAINED:
        raise KeyError(f"${{llava_pretrained:{name}}}: unknown name; known: {sorted(PRETRAINED)}")
    return PRETRAINED[name]()


def register_configs() -> None:
    """Register the schema and resolvers with Hydra / OmegaConf (idempotent; called by entry points and tests)."""
    ConfigStore.instance().store(name="llava_train_schema", node=Config)
    if not OmegaConf.has_resolver("llava_pretrained"):
        OmegaConf.register_new_resolver("llava_pretrained", lambda name: _resolve_pretrained(name))


def tool_argv(argv: list[str]) -> list[str]:
    """``argv`` of a tool entry point (eval, export, ...) whose outputs are the paths it is given: Hydra gets
    no run folder, no .hydra output and no log file."""
    return argv[:1] + ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=stdout"] + argv[1:]


def normalize_argv(argv: list[str]) -> list[str]:
    """Make launcher and Hydra agree on the command line.

    - The `deepspeed` launcher appends `--local_rank=N`, which Hydra rejects: drop it (LOCAL_RANK is in the env).
    - conf/config.yaml lists every group (`stage: null` included) so that `stage=finetune` works; Hydra then
      refuses `+stage=finetune` ("Multiple values for stage"), the form the README and the original LLaVA
      scripts use. `+group=x` for a group of the defaults list means the same as `group=x`: rewrite it.
    """
    out, args = [], iter(argv)
    for arg in args:
        if arg in ("--local_rank", "--local-rank"):
            next(args, None)  # its value
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", arg):
            continue
        m = re.fullmatch(r"\+([a-z_]+)=(.*)", arg)
        if m and m.group(1) in CONFIG_GROUPS:
            arg = f"{m.group(1)}={m.group(2)}"
        out.append(arg)
    return out


def compose_config(overrides: list[str]) -> DictConfig:
    """The config launch/train.py composes from these command-line overrides, composed in this process."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=normalize_argv(overrides))


def to_typed(cfg: DictConfig) -> Config:
    """Resolve and validate a composed config into dataclass instances; fail with the fix in the message."""
    if OmegaConf.is_missing(cfg.stage, "name"):
        raise ValueError(
            "No stage chosen. Add one of: stage=pretrain | stage=finetune | stage=finetune_lora "
            "(`+stage=...` works too), e.g. `python launch/train.py stage=pretrain`."
        )
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(
            f"Unknown config keys {unknown} (a typo, or `+key=` added a key the schema does not have). "
            "Valid keys are the fields of the dataclasses in llava_train/config.py and the model / data configs."
        )
    missing = missing_keys(cfg)
    if missing:
        raise ValueError(
            f"Missing mandatory values: {missing}. Set them on the command line, e.g. `{missing[0]}=/path/...`"
            " (stage.pretrain_mm_mlp_adapter=null starts stage 2 from a random projector on purpose)."
        )
    typed: Config = OmegaConf.to_object(cfg)
    check_consistency(typed)
    return typed


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys that are no field of the schema: Hydra's `+group.key=value` slips past struct mode."""

    def walk(node, cls, prefix: str):
        if not (dataclasses.is_dataclass(cls) and isinstance(node, dict)):
            return
        hints = typing.get_type_hints(cls)
        for k, v in node.items():
            if k not in hints:
                yield prefix + k
            else:
                yield from walk(v, hints[k], f"{prefix}{k}.")

    return sorted(walk(OmegaConf.to_container(cfg, resolve=False), Config, ""))


def missing_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys still `???` (without resolving interpolations, which would fail on them first)."""

    def walk(node, prefix: str):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}{k}.")
        elif node == "???":
            yield prefix[:-1]

    return sorted(walk(OmegaConf.to_container(cfg, resolve=False), ""))


def check_consistency(cfg: Config) -> None:
    """Cross-field checks the types cannot express."""
    t = cfg.training
    if t.global_batch_size <= 0 or t.per_device_batch_size <= 0:
        raise ValueError(
            f"training.global_batch_size ({t.global_batch_size}) and training.per_device_batch_size "
            f"({t.per_device_batch_size}) must be positive."
        )
    check_ranges(cfg)
    if not 0 <= t.warmup_ratio < 1:
        raise ValueError(  # the Trainer reads a value >= 1 as a number of steps
            f"training.warmup_ratio={t.warmup_ratio} must be in [0, 1): a fraction of the total steps."
        )
    if cfg.deepspeed.config_file and cfg.fsdp.enabled:
        raise ValueError("Choose DeepSpeed or FSDP, not both: set deepspeed=none or fsdp=none.")
    if cfg.stage.tune_llm is LlmTuning.lora and not cfg.stage.lora.target_modules:
        raise ValueError("stage.lora.target_modules is empty: LoRA would train nothing.")
    if cfg.eval.enabled and (cfg.eval.eval_steps < 1 or cfg.eval.per_device_batch_size < 1):
        raise ValueError(
            f"eval.eval_steps ({cfg.eval.eval_steps}) and eval.per_device_batch_size "
            f"({cfg.eval.per_device_batch_size}) must be positive."
        )
    if t.global_batch_tokens is not None and cfg.data.max_tokens_per_batch is None:
        raise ValueError(
            "training.global_batch_tokens needs token-budget micro-batches: set data.max_tokens_per_batch "
            "(or use training.global_batch_size)."
        )
    if cfg.stage.lora.qlora and cfg.stage.tune_llm is not LlmTuning.lora:
        raise ValueError("stage.lora.qlora=true only applies to stage=finetune_lora.")


def check_ranges(cfg: Config) -> None:
    """Numbers that have a valid range: a negative learning rate would train by gradient ascent."""
    t, lora, m = cfg.training, cfg.stage.lora, cfg.model
    checks = [
        ("training.learning_rate", t.learning_rate, t.learning_rate > 0, "> 0"),
        ("training.weight_decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
        ("training.adam_beta1", t.adam_beta1, 0 <= t.adam_beta1 < 1, "in [0, 1)"),
        ("training.adam_beta2", t.adam_beta2, 0 <= t.adam_beta2 < 1, "in [0, 1)"),
        ("training.adam_epsilon", t.adam_epsilon, t.adam_epsilon > 0, "> 0"),
        ("training.max_grad_norm", t.max_grad_norm, t.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
        ("training.num_train_epochs", t.num_train_epochs, t.num_train_epochs > 0 or t.max_steps > 0, "> 0"),
        ("training.max_steps", t.max_steps, t.max_steps == -1 or t.max_steps > 0, "> 0, or -1 (epochs)"),
        ("training.save_steps", t.save_steps, t.save_steps > 0, "> 0"),
        ("training.logging_steps", t.logging_steps, t.logging_steps > 0, "> 0"),
        ("training.max_nonfinite_steps", t.max_nonfinite_steps, t.max_nonfinite_steps >= 1, ">= 1"),
        ("stage.lora.r", lora.r, lora.r >= 1, ">= 1"),
        ("stage.lora.alpha", lora.alpha, lora.alpha > 0, "> 0"),
        ("stage.lora.dropout", lora.dropout, 0 <= lora.dropout < 1, "in [0, 1)"),
        (
            "model.model_max_length",
            m.model_max_length,
            m.model_max_length is None or m.model_max_length > 0,
            "> 0",
        ),
        ("data.num_workers", cfg.data.num_workers, cfg.data.num_workers >= 0, ">= 0"),
        ("data.max_image_pixels", cfg.data.max_image_pixels, cfg.data.max_image_pixels > 0, "> 0"),
    ]
    optional = (
        ("training.peak_tflops", t.peak_tflops),
        ("training.global_batch_tokens", t.global_batch_tokens),
        ("data.max_tokens_per_batch", cfg.data.max_tokens_per_batch),
    )
    checks += [(name, value, value > 0, "> 0, or null") for name, value in optional if value is not None]
    for name, lr in (("mm_projector_lr", t.mm_projector_lr), ("mm_vision_tower_lr", t.mm_vision_tower_lr)):
        if lr is not None:
            checks.append((f"training.{name}", lr, lr > 0, "> 0, or null (learning_rate)"))
    if t.save_total_limit is not None:
        checks.append(
            ("training.save_total_limit", t.save_total_limit, t.save_total_limit >= 1, ">= 1, or null")
        )
    bad = [f"{name}={value} (must be {rule})" for name, value, ok, rule in checks if not ok]
    if bad:
        raise ValueError(f"out-of-range settings: {'; '.join(bad)}.")
    if t.resume and t.overwrite:
        raise ValueError(
            "training.resume=true and training.overwrite=true: choose one (continue, or start over)."
        )


def deepspeed_config_path(cfg: DeepSpeedConfig) -> str | None:
    """Absolute path of the DeepSpeed JSON (relative paths are under conf/deepspeed/), or None."""
    if not cfg.config_file:
        return None
    path = Path(cfg.config_file)
    if not path.is_absolute():
        path = CONF_DIR / "deepspeed" / path
    if not path.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config {path} not found (deepspeed.config_file={cfg.config_file!r})."
        )
    return str(path)


def gradient_accumulation_steps(global_batch: int, per_device: int, world_size: int) -> int:
    """global = per_device * world_size * accumulation, exactly; otherwise say which numbers would work."""
    per_step = per_device * world_size
    if global_batch % per_step:
        raise ValueError(
            f"training.global_batch_size={global_batch} is not a multiple of per_device_batch_size={per_device}"
            f" x world_size={world_size} (= {per_step}). Pick a global batch that is a multiple of {per_step}, "
            f"or a per-device batch that divides {global_batch // world_size if global_batch % world_size == 0 else global_batch}."
        )
    return global_batch // per_step


def token_accumulation_steps(global_tokens: int | None, budget: int, world_size: int) -> int:
    """Accumulation steps of token-budget micro-batches: global_tokens = budget * world_size * steps, exactly
    (None: 1). Each micro-batch holds at most ``budget`` tokens, so a step holds at most ``global_tokens``."""
    if global_tokens is None:
        return 1
    per_step = budget * world_size
    if global_tokens % per_step:
        raise ValueError(
            f"training.global_batch_tokens={global_tokens} is not a multiple of data.max_tokens_per_batch={budget}"
            f" x world_size={world_size} (= {per_step}): pick a multiple of {per_step}, e.g. "
            f"{max(global_tokens // per_step, 1) * per_step}."
        )
    return global_tokens // per_step
