"""Load DeepSpeed checkpoint states without unpickling code.

DeepSpeed's `TorchCheckpointEngine.load` unpickles with torch.load's weights_only switched off: a
`*_model_states.pt` or `*_optim_states.pt` planted in a checkpoint runs whatever its pickle's `__reduce__`
says on resume. The
Trainer resumes DeepSpeed through `engine.load_checkpoint`, which reads every state file through
`engine.checkpoint_engine.load`; `use_safe_checkpoint_engine` replaces that method of the engine's checkpoint
engine with `safe_torch_load`: `torch.load(weights_only=True)`, with torch's allowlist widened by exactly the
DeepSpeed types its ZeRO-1/2/3 states hold (DEEPSPEED_SAFE_GLOBALS, found by
`torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints written by DeepSpeed 0.19.8). Any other
global is refused before it is called, and the error names the file and the globals.

Our own loads need nothing of this: optimizer.pt / scheduler.pt / rng_state*.pth go through the Trainer's
`torch.load(weights_only=True)`, and the weights are safetensors.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
from typing import Any

import torch

logger = logging.getLogger(__name__)

# "module.Name" of every non-torch global DeepSpeed 0.19.8 pickles into its checkpoint states.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint state file holds a pickled global outside the allowlist; nothing of it was run."""


def _resolve(qualname: str) -> Any:
    module, _, name = qualname.rpartition(".")
    return getattr(importlib.import_module(module), name)


def safe_globals() -> list[Any]:
    """The allowlisted DeepSpeed classes (imported on call: DeepSpeed is an optional, heavy import)."""
    return [_resolve(q) for q in DEEPSPEED_SAFE_GLOBALS]


def safe_torch_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` with DEEPSPEED_SAFE_GLOBALS allowed; UnsafeCheckpointError,
    naming the file and the refused globals, for anything else."""
    with torch.serialization.safe_globals(safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            try:
                found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception:  # not a zip checkpoint: the message of torch.load is all there is
                found = []
            allowed = set(DEEPSPEED_SAFE_GLOBALS)
            refused = [g for g in found if g not in allowed] or found
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it pickles {refused or 'globals'} that are not tensors, containers "
                "or the DeepSpeed state types this framework allows, so loading it could run code. Do not "
                "resume from a checkpoint of unknown origin; if this file is genuine (a newer DeepSpeed that "
                "saves another type), add that type to llava_train.train.safe_load.DEEPSPEED_SAFE_GLOBALS. "
                f"({str(e).splitlines()[0]})"
            ) from None


def use_safe_checkpoint_engine(engine: Any) -> None:
    """Make a DeepSpeedEngine read its checkpoint states with `safe_torch_load` (saving is unchanged)."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = safe_torch_load  # an instance attribute shadows the class's method
    logger.info(
        "DeepSpeed checkpoint states load with weights_only=True (%s)", type(checkpoint_engine).__name__
    )
