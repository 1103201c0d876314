"""Training stages as data, applied in one place: `apply_stage(model, stage_cfg)`.

A stage decides which components train; it is a `StageConfig` (conf/stage/*.yaml), never inferred from a
folder or checkpoint name. Components are found by parameter name (the original LLaVA checkpoint keys):

    vision_tower   model.vision_tower.*          CLIP tower (frozen unless stage.tune_vision_tower)
    projector      model.mm_projector.*          trains in every stage
    image_newline  model.image_newline           spatial_unpad newline; trains with the projector
    llm            model.embed_tokens/layers/norm
    lm_head        lm_head.*
    lora           *.lora_A / *.lora_B           peft adapters (finetune_lora only)

    pretrain       projector (+ image_newline) [+ vision tower]          template `plain`
    finetune       LLM + lm_head + projector (+ image_newline) [+ vision tower]
    finetune_lora  LoRA on the LLM's decoder-layer linears + projector (+ image_newline) [+ vision tower]

The image_newline goes with the projector: it is the connector's freshly initialised parameter, and
leaving it at its random init while the projector learns around it helps nobody.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from llava_train.config import LlmTuning, LoraConfig, StageConfig, StageName
from llava_train.model.projector import load_projector
from llava_train.model.zero3 import full_numel, is_sharded

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
COMPONENTS = ("vision_tower", "projector", "image_newline", "llm", "lm_head", "lora")


def original_name(name: str) -> str:
    """Parameter name as in an original LLaVA checkpoint (peft's wrapper prefix removed)."""
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def component_of(name: str) -> str:
    """Which component a parameter (or state-dict key) belongs to."""
    name = original_name(name)
    if ".lora_" in name:
        return "lora"
    if name.startswith("model.vision_tower."):
        return "vision_tower"
    if name.startswith("model.mm_projector."):
        return "projector"
    if name.startswith("model.image_newline"):
        return "image_newline"
    if name.startswith("lm_head."):
        return "lm_head"
    return "llm"


def lora_target_regex(lora: LoraConfig) -> str:
    """peft full-match regex: the listed linear layers inside the LLM decoder layers, nothing else.

    The CLIP tower has q_proj / k_proj / v_proj too (under model.vision_tower...encoder.layers), hence
    the anchor on `model.layers` instead of peft's plain name-suffix matching.
    """
    names = "|".join(re.escape(m) for m in lora.target_modules)
    return rf"(?:{re.escape(PEFT_PREFIX)})?{lora.layers_regex}\.(?:{names})"


def apply_stage(model: nn.Module, stage: StageConfig) -> nn.Module:
    """Freeze / unfreeze / wrap with LoRA per `stage`; log a table per component. Returns the model to train.

    The returned model is a `peft.PeftModel` for finetune_lora, otherwise `model` itself.
    """
    tune_llm = stage.tune_llm
    model.requires_grad_(False)
    inner = model.get_model()
    if stage.pretrain_mm_mlp_adapter:
        path = stage.pretrain_mm_mlp_adapter
        load_projector(inner.mm_projector, path)
        logger.info("loaded stage-1 projector from %s", path)
    elif tune_llm is not LlmTuning.frozen:
        logger.warning(
            "stage %s without stage.pretrain_mm_mlp_adapter: the projector starts from its random init "
            "(set it to the stage-1 run's mm_projector.safetensors).",
            StageName(stage.name).value,
        )

    if tune_llm is LlmTuning.full:
        model.requires_grad_(True)
        inner.get_vision_tower().requires_grad_(False)
    elif tune_llm is LlmTuning.lora:
        model = _wrap_lora(model, stage.lora)
        inner = model.get_base_model().get_model()
        if stage.lora.train_embeddings:
            inner.embed_tokens.requires_grad_(True)
            model.get_base_model().lm_head.requires_grad_(True)

    inner.mm_projector.requires_grad_(stage.tune_projector)
    if getattr(inner, "image_newline", None) is not None:
        inner.image_newline.requires_grad_(stage.tune_projector)
    if stage.tune_vision_tower:
        inner.get_vision_tower().requires_grad_(True)
    _match_zero3_dtype(model)
    logger.info(
        "stage %s (LLM %s):\n%s", StageName(stage.name).value, tune_llm.value, format_trainable_table(model)
    )
    return model


def _match_zero3_dtype(model: nn.Module) -> None:
    """A model built under zero.Init is not cast by DeepSpeed, and ZeRO-3 trains one dtype: parameters created
    after the build (peft's LoRA weights are fp32) take the dtype of the sharded ones (bf16 / fp16 runs)."""
    sharded = [p for p in model.parameters() if is_sharded(p)]
    if not sharded:
        return
    dtype = sharded[0].dtype
    for p in model.parameters():
        if not is_sharded(p) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def _wrap_lora(model: nn.Module, lora: LoraConfig) -> nn.Module:
    if lora.qlora:
        _check_qlora_possible(model)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_regex(lora),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    if lora.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, peft_cfg)
    wrapped = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
    if not wrapped:
        raise ValueError(
            f"LoRA matched no module with regex {peft_cfg.target_modules!r}; check stage.lora.target_modules "
            "and stage.lora.layers_regex against the model's module names (model.layers.N.self_attn.q_proj)."
        )
    outside = [n for n in wrapped if component_of(n + ".weight") != "lora" or "vision_tower" in n]
    if outside:
        raise AssertionError(f"LoRA leaked outside the LLM decoder layers: {outside[:4]}")
    return model


def _check_qlora_possible(model: nn.Module) -> None:
    """QLoRA needs CUDA + bitsandbytes + a 4-bit base model; say which one is missing."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "stage.lora.qlora=true needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
            "Use stage.lora.qlora=false (plain LoRA) on CPU."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError("stage.lora.qlora=true needs bitsandbytes: pip install bitsandbytes") from e
    if not getattr(model, "is_loaded_in_4bit", False):
        raise RuntimeError(
            "stage.lora.qlora=true needs the LLM loaded in 4-bit (BitsAndBytesConfig(load_in_4bit=True, "
            "bnb_4bit_quant_type='nf4')) by the model builder; this model's weights are not quantized."
        )


def trainable_summary(model: nn.Module) -> dict[str, tuple[int, int]]:
    """component -> (trainable params, total params)."""
    summary = {c: [0, 0] for c in COMPONENTS}
    for n, p in model.named_parameters():
        c = summary[component_of(n)]
        numel = full_numel(p)
        c[1] += numel
        if p.requires_grad:
            c[0] += numel
    return {c: (t, n) for c, (t, n) in summary.items() if n}


def format_trainable_table(model: nn.Module) -> str:
    """A frozen / trainable line per component (prismatic's freeze_backbones log)."""
    rows = [f"  {'component':<14} {'state':<10} {'trainable':>14} {'total':>14}"]
    total_t = total_n = 0
    for comp, (t, n) in trainable_summary(model).items():
        state = "trainable" if t == n else "frozen" if t == 0 else "partial"
        rows.append(f"  {comp:<14} {state:<10} {t:>14,} {n:>14,}")
        total_t, total_n = total_t + t, total_n + n
    rows.append(
        f"  {'all':<14} {'':<10} {total_t:>14,} {total_n:>14,}  ({100 * total_t / max(total_n, 1):.2f}%)"
    )
    return "\n".join(rows)
