"""Vision projector: maps vision features [.., mm_hidden_size] to LLM embeddings [.., hidden_size].

Forms (``mm_projector_type``): ``linear``, ``mlp{N}x_gelu`` (N linear layers with GELU between,
any N >= 1), ``identity``. MLPs are an ``nn.Sequential`` so checkpoint keys read
``mm_projector.0.weight``, ``mm_projector.2.weight``, ... as in the original LLaVA.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

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
