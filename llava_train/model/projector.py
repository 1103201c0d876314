"""Vision projector: maps vision features [.., mm_hidden_size] to LLM embeddings [.., hidden_size].

Forms (``mm_projector_type``): ``linear``, ``mlp{N}x_gelu`` (N linear layers with GELU between,
any N >= 1), ``identity``. MLPs are an ``nn.Sequential`` so checkpoint keys read
``mm_projector.0.weight``, ``mm_projector.2.weight``, ... as in the original LLaVA. Saved projectors
(stage 1's ``mm_projector.safetensors``, or the original's ``mm_projector.bin``) load with their keys checked.
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

from llava_train.model.zero3 import gathered

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
ACCEPTED_PROJECTORS = "'linear', 'mlp{N}x_gelu' (e.g. 'mlp2x_gelu'), 'identity'"


def build_vision_projector(config: Any, delay_load: bool = False, **kwargs: Any) -> nn.Module:
    """Projector for ``config.mm_projector_type`` (default ``linear``)."""
    projector_type = getattr(config, "mm_projector_type", None) or "linear"
    in_dim, out_dim = config.mm_hidden_size, config.hidden_size
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    if projector_type == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"identity projector needs mm_hidden_size == hidden_size, got {in_dim} != {out_dim}"
            )
        return nn.Identity()
    match = _MLP_GELU.match(projector_type)
    if match and int(match.group(1)) >= 1:
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(int(match.group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown mm_projector_type {projector_type!r}; accepted: {ACCEPTED_PROJECTORS}")


def load_projector_weights(path: str) -> dict[str, torch.Tensor]:
    """State dict of a saved projector: ``.safetensors``, or a legacy ``.bin`` (weights only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"pretrain_mm_mlp_adapter {path!r} is not a file (mm_projector.bin/.safetensors)"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def state_mismatch(
    expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> tuple[list, list, list]:
    """(missing, unexpected, shape-mismatched) keys of ``state`` against the ``expected`` state dict."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, wrong


def projector_state_from(weights: dict[str, torch.Tensor], projector: nn.Module, path: str) -> dict:
    """Keys after ``mm_projector.`` (any prefix, e.g. ``model.mm_projector.``), checked against ``projector``."""
    state = {k.split("mm_projector.", 1)[1]: v for k, v in weights.items() if "mm_projector." in k}
    missing, unexpected, wrong = state_mismatch(projector.state_dict(), state)
    if missing or unexpected or wrong:
        raise ValueError(
            f"projector weights in {path} do not fit this projector ({projector.__class__.__name__}): "
            f"missing {missing}, unexpected {unexpected}, shape mismatch {wrong}; file keys {sorted(weights)[:8]}. "
            "Check mm_projector_type / mm_hidden_size / hidden_size against the run that saved it."
        )
    return state


def load_projector(projector: nn.Module, path: str) -> None:
    """Load the ``mm_projector`` weights of ``path`` into ``projector`` (gathered whole under ZeRO-3)."""
    with gathered(list(projector.parameters())):
        projector.load_state_dict(projector_state_from(load_projector_weights(path), projector, path))
