"""Merge a LoRA run (peft adapter + non-LoRA trainables) into the full LLaVA model it started from.

Everything is named explicitly: the base model (a saved model directory or a model object) and the
adapter directory. Nothing is inferred from folder names. The adapter directory is what a
``finetune_lora`` checkpoint holds (see llava_train/train/checkpoint.py):

    adapter_config.json + adapter_model.safetensors   peft LoRA weights of the LLM decoder layers
    non_lora_trainables.safetensors                   projector, image_newline, [tower], original keys
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from llava_train.constants import NON_LORA_FILE, PROJECTOR_FILE, VISION_TOWER_FILE
from llava_train.model import LlavaLlamaForCausalLM

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load_base(base: str | os.PathLike | LlavaLlamaForCausalLM, dtype: torch.dtype) -> LlavaLlamaForCausalLM:
    """The base model: ``base`` itself, or the saved model in ``base`` as its LLM family's class, every
    weight checked (a Gemma or Qwen3 base read as Llama would silently drop its extra norms)."""
    from llava_train.export.original import load_original

    if isinstance(base, nn.Module):
        return base
    check_base_dir(Path(base))
    return load_original(base, dtype)


def check_base_dir(base: Path) -> None:
    """Fail with the fix when ``base`` is not a saved model directory."""
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"base {str(base)!r} is not a saved model directory (no config.json): pass the directory "
            "of the full model the LoRA run started from (save_pretrained output), or the model object"
        )


def check_adapter_dir(adapter_dir: Path) -> None:
    """Fail with the list of missing files when ``adapter_dir`` is not a finetune_lora checkpoint."""
    missing = [f for f in (*ADAPTER_FILES, NON_LORA_FILE) if not (adapter_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"adapter_dir {str(adapter_dir)!r} lacks {missing}: pass a checkpoint directory of a "
            "`finetune_lora` run (it holds the peft adapter and non_lora_trainables.safetensors)"
        )


@torch.no_grad()
def load_non_lora(model: nn.Module, path: Path) -> list[str]:
    """Copy the non-LoRA trainables (original key names) into ``model``; every key must be a parameter."""
    params = dict(model.named_parameters())
    loaded = []
    for key, value in load_file(str(path)).items():
        if key not in params:
            raise KeyError(
                f"{path}: {key!r} is not a parameter of the base model (was it a different model?)"
            )
        if params[key].shape != value.shape:
            raise ValueError(
                f"{path}: {key!r} has shape {tuple(value.shape)}, the base model {tuple(params[key].shape)}"
            )
        params[key].copy_(value)
        loaded.append(key)
    return loaded


def _check_adapter_loaded(peft_model: nn.Module, adapter_dir: Path) -> None:
    """Every LoRA matrix of the wrapped model must come from the adapter file (peft only warns)."""
    in_file = [k for k in load_file(str(adapter_dir / ADAPTER_FILES[1])) if ".lora_" in k]
    in_model = [n for n, _ in peft_model.named_parameters() if ".lora_" in n]
    if len(in_file) != len(in_model):
        raise ValueError(
            f"{adapter_dir}: the adapter file has {len(in_file)} LoRA tensors, the wrapped base model "
            f"{len(in_model)}: the adapter was trained on a different base (layers / target modules)"
        )


def merge_lora(
    base: str | os.PathLike | LlavaLlamaForCausalLM,
    adapter_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> LlavaLlamaForCausalLM:
    """Base + LoRA adapter + non-LoRA trainables -> one merged model (no peft left in it), in eval mode.

    Args:
        base: the directory of the full model the LoRA run started from, or that model (modified in place).
        adapter_dir: a ``finetune_lora`` checkpoint directory.
        dtype: dtype to load ``base`` in when it is a path (merge in float32 for exactness).
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not isinstance(base, nn.Module):
        check_base_dir(Path(base))
    check_adapter_dir(adapter_dir)
    model = load_base(base, dtype)
    loaded = load_non_lora(model, adapter_dir / NON_LORA_FILE)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    _check_adapter_loaded(peft_model, adapter_dir)
    merged = peft_model.merge_and_unload()
    logger.info("merged LoRA from %s (+ %d non-LoRA tensors)", adapter_dir, len(loaded))
    return merged.eval()


def merge_pretrain(
    base: str | os.PathLike | LlavaLlamaForCausalLM,
    pretrain_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> LlavaLlamaForCausalLM:
    """Base + a ``pretrain`` (stage 1) run's projector (+ tower, when it trained) -> one full model.

    Stage 2 usually needs only the projector (``stage.pretrain_mm_mlp_adapter``); when stage 1 also
    trained the vision tower (a random one, ``stage.tune_vision_tower=true``), this folds both into a
    model directory that stage 2 starts from (``model.llm_path``) and that a later LoRA merge uses as
    its base.
    """
    pretrain_dir = Path(pretrain_dir)
    projector, tower = pretrain_dir / PROJECTOR_FILE, pretrain_dir / VISION_TOWER_FILE
    if not projector.is_file():
        raise FileNotFoundError(
            f"pretrain_dir {str(pretrain_dir)!r} has no {PROJECTOR_FILE}: pass the run dir (or a "
            "checkpoint dir) of a `pretrain` stage"
        )
    model = load_base(base, dtype)
    loaded = load_non_lora(model, projector)
    if tower.is_file():
        loaded += load_non_lora(model, tower)
    logger.info("merged stage-1 weights from %s (%d tensors)", pretrain_dir, len(loaded))
    return model.eval()
