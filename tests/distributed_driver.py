"""Per-rank driver for tests/test_distributed.py (run under torchrun; holds no tests itself).

    torchrun --nproc_per_node 2 tests/distributed_driver.py <hydra overrides...>

Runs the launcher's steps and writes <run_dir>/rank<R>.json: the logged losses, the sample ids of every
micro-batch, a checksum of every parameter, gathered under ZeRO-3, so the test can check that the ranks
trained one model on different data, and every file this rank wrote under run_dir (who writes what, on one
node or two: tests/test_multinode.py).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from train_utils import compose_config, logged_losses, run_steps  # noqa: E402

from llava_train.model.zero3 import gathered, is_sharded  # noqa: E402


def checksum(model) -> float:
    params = list(model.parameters())
    with gathered(params, modifier_rank=None), torch.no_grad():
        return float(sum(p.double().sum() for p in params))


def record_batches(seen: list) -> None:
    """Append every micro-batch's sample ids to ``seen`` (the loader collates in this process: workers 0)."""
    from llava_train.data.collator import DataCollator

    collate = DataCollator.__call__

    def recording(self, samples):
        batch = collate(self, samples)
        seen.append(batch["sample_ids"])
        return batch

    DataCollator.__call__ = recording


def record_writes(root: Path, written: list, appended: list) -> None:
    """Append to ``written`` the path, relative to ``root``, of every file this process writes under it: Python's
    open for writing (an audit hook), torch.save and safetensors (both write from C++, unseen by the hook);
    to ``appended`` each open of a file for appending (a log, written to many times)."""
    import safetensors.torch

    root = str(root.resolve())
    inside = threading.local()  # a torch.save that opens its file in Python counts once

    def add(path, into: list = written) -> None:
        path = os.path.abspath(os.fspath(path))
        if path.startswith(root + os.sep):
            into.append(os.path.relpath(path, root))

    def hook(event, args):
        writing = event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+")
        if writing and not getattr(inside, "on", False) and isinstance(args[0], (str, os.PathLike)):
            add(args[0], appended if "a" in args[1] else written)

    def counted(fn):
        def wrapper(obj, path, *a, **k):
            if isinstance(path, (str, os.PathLike)):
                add(path)
            inside.on = True
            try:
                return fn(obj, path, *a, **k)
            finally:
                inside.on = False

        return wrapper

    sys.addaudithook(hook)
    torch.save = counted(torch.save)
    safetensors.torch.serialize_file = counted(safetensors.torch.serialize_file)


def main() -> None:
    raw = compose_config(sys.argv[1:])
    built = {}
    batches: list[list[str]] = []
    record_batches(batches)
    written: list[str] = []
    appended: list[str] = []
    record_writes(Path(raw.training.run_dir), written, appended)

    def record(model) -> None:  # before DeepSpeed's engine exists: sharded only if zero.Init built it
        decoder = [
            p
            for n, p in model.named_parameters()
            if ".layers." in n and "vision" not in n and "lora_" not in n
        ]
        assert decoder, "no decoder parameter matched"
        built["llm_sharded_at_build"] = all(is_sharded(p) for p in decoder)
        built["llm_local_numel"] = sum(p.numel() for p in decoder)
        projector = [p for n, p in model.named_parameters() if "mm_projector" in n]
        with gathered(projector, modifier_rank=None), torch.no_grad():  # its values as loaded, whole
            built["projector_sum"] = float(sum(p.double().sum() for p in projector))

    trainer, model, _ = run_steps(raw, before_train=record)
    rank = int(os.environ.get("RANK", "0"))
    out = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "losses": logged_losses(trainer),
        "grad_norms": {h["step"]: h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h},
        "checksum": checksum(trainer.model),
        "batches": batches,
        "eval_logs": [h for h in trainer.state.log_history if "eval_score" in h],  # eval=vqa runs only
        "eval_answered": next(
            (cb.answered_here for cb in trainer.callback_handler.callbacks if hasattr(cb, "answered_here")),
            None,
        ),
        "written": list(written),
        "appended": list(appended),
        **built,
    }
    Path(raw.training.run_dir, f"rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
