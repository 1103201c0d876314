"""Liger-Kernel's fused Triton kernels on a built LLaVA model (`training.liger_kernel=true`, GPU only).

The optional `liger` extra (`pip install -e '.[liger]'` on a CUDA machine; never needed on CPU). Applied to
the decoder of the model's family: liger's RMSNorm, RoPE and SwiGLU MLP (GeGLU for Gemma 3) replace
transformers' modules, through liger's own per-family patch functions; the vision tower and the projector
are untouched. The supervised loss (llava_lm._supervised_loss) then computes lm_head and the cross-entropy
with liger's fused linear cross-entropy, in chunks, never holding the [n_sup, V] logits; Gemma's final
logit softcapping is passed to it (liger caps tanh(x / cap) * cap, as the plain path does).

Liger's patch functions also replace the family's classes in transformers' modeling module, so a model of
that family built later in the same process gets the kernels too. ZeRO-3 is refused: the fused loss reads
lm_head.weight outside lm_head's forward, where ZeRO-3 holds only this rank's partition of it.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

# family -> (liger's patch function in liger_kernel.transformers, the keyword of its MLP kernel)
PATCHES = {
    "llama": ("apply_liger_kernel_to_llama", "swiglu"),
    "mistral": ("apply_liger_kernel_to_mistral", "swiglu"),
    "qwen2": ("apply_liger_kernel_to_qwen2", "swiglu"),
    "qwen3": ("apply_liger_kernel_to_qwen3", "swiglu"),
    "gemma3": ("apply_liger_kernel_to_gemma3_text", "geglu"),
}


def check_liger(zero3: bool = False) -> None:
    """Raise, naming the fix, unless liger's kernels can run here: a CUDA device, liger-kernel importable,
    not ZeRO-3. Called before the model is built."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "training.liger_kernel=true: liger's kernels are Triton GPU kernels and this machine has no CUDA "
            "device. Set training.liger_kernel=false (the plain path computes the same loss)."
        )
    try:
        importlib.import_module("liger_kernel.transformers")
    except ImportError as e:
        raise RuntimeError(
            f"training.liger_kernel=true but liger-kernel is not importable ({e}). Install the extra on this "
            "CUDA machine: pip install -e '.[liger]' (or pip install liger-kernel), or set "
            "training.liger_kernel=false."
        ) from e
    if zero3:
        raise RuntimeError(
            "training.liger_kernel=true with ZeRO-3: liger's fused cross-entropy reads lm_head.weight outside "
            "lm_head's forward, where ZeRO-3 holds only this rank's partition. Use deepspeed=zero2 or "
            "fsdp, or training.liger_kernel=false."
        )


def apply_liger(model: Any, family: str) -> None:
    """Patch the decoder of ``model`` (a LLaVA causal LM of ``family``) with liger's kernels and make its
    supervised loss liger's fused linear cross-entropy. check_liger first."""
    if family not in PATCHES:
        raise ValueError(f"no liger kernels for LLM family {family!r}; liger covers {sorted(PATCHES)}")
    liger = importlib.import_module("liger_kernel.transformers")
    name, mlp = PATCHES[family]
    # The loss is ours (supervised rows only, our token count): liger's own loss forwards stay off.
    getattr(liger, name)(
        rope=True,
        rms_norm=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
        model=model,
        **{mlp: True},
    )
    functional = importlib.import_module("liger_kernel.transformers.functional")
    model.fused_linear_cross_entropy = functional.liger_fused_linear_cross_entropy
