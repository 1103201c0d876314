"""GPU check of packing (for benchmarks/gpu_check.sh): packed == unpacked, and packed vs unpacked step speed.

For each attention implementation available (sdpa; sdpa_varlen, one causal sdpa call per packed sample;
flash_attention_2 when flash-attn is installed, where packing goes through the restarting position ids
and the varlen kernel): the loss and gradient norm of a
packed batch against the same samples unpacked, then tokens/s of the train step (bench_train_step sizes)
unpacked vs packed. Exits 1 when packed and unpacked disagree. Also runs on CPU (``--device cpu``).

    python benchmarks/gpu_packed.py [--device cuda] [--dtype bfloat16] [--out benchmarks/out/gpu_packed.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_step import IMAGE_SIDE, PATCH, SIZES, VOCAB, _Vocab, epochs  # noqa: E402
from synthetic import Mix, samples  # noqa: E402

from llava_train.constants import IGNORE_INDEX  # noqa: E402
from llava_train.model import ModelConfig, build_model  # noqa: E402


def build(attn: str, dtype: str, device: str, max_length: int):
    cfg = ModelConfig(
        preset="tiny",
        num_key_value_heads=SIZES["num_attention_heads"],
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, image_size=IMAGE_SIDE),
        image_aspect_ratio="pad",
        mm_patch_merge_type="flat",
        model_max_length=max_length,
        attn_implementation=attn,
        dtype=dtype,
        **SIZES,
    )
    return build_model(cfg, _Vocab()).to(device).train()


def to(batch: dict, device: str, dtype: torch.dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, dtype=dtype if v.is_floating_point() else None)
        out[k] = v
    return out


def loss_and_grad_norm(model, batch: dict, n_items: int) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch, num_items_in_batch=torch.tensor(n_items, device=model.device)).loss
    loss.backward()
    norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), float(norm)


def step_rate(model, batches: list[dict], supervised: int, device: str) -> float:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def epoch() -> None:
        for b in batches:
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    epoch()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    epoch()
    if device == "cuda":
        torch.cuda.synchronize()
    return supervised / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "gpu_packed.json"))
    a = parser.parse_args()
    dtype = getattr(torch, a.dtype)
    attns = ["sdpa", "sdpa_varlen"] + (
        ["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []
    )
    mix = Mix(image_tokens=(IMAGE_SIDE // PATCH) ** 2, image_text_median=80, text_only_median=250, hi=440)
    data = samples(a.samples, mix, VOCAB - 1, IMAGE_SIDE, seed=0, max_length=a.max_length)
    for s in data:
        s["labels"][0] = IGNORE_INDEX
    supervised = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in data)
    runs = epochs(data, 8, 4, a.max_length, seed=0)
    results, ok = [], True
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for attn in attns:
        torch.manual_seed(0)
        model = build(attn, a.dtype, a.device, a.max_length)
        plain = [to(b, a.device, dtype) for b in runs["ours"]]
        packed = [to(b, a.device, dtype) for b in runs["ours_packed"]]
        ref = [loss_and_grad_norm(model, b, supervised) for b in plain]
        got = [loss_and_grad_norm(model, b, supervised) for b in packed]
        loss_ref, loss_got = sum(x[0] for x in ref), sum(x[0] for x in got)  # both = total CE / supervised
        same = abs(loss_ref - loss_got) <= tol * max(1.0, abs(loss_ref))
        ok &= same
        row = dict(attn=attn, loss_unpacked=loss_ref, loss_packed=loss_got, same=same)
        row["unpacked_tok_s"] = round(step_rate(model, plain, supervised, a.device), 1)
        row["packed_tok_s"] = round(step_rate(model, packed, supervised, a.device), 1)
        row["speedup"] = round(row["packed_tok_s"] / row["unpacked_tok_s"], 2)
        results.append(row)
        print(json.dumps(row))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=a.device, dtype=a.dtype, torch=torch.__version__, samples=a.samples)
    if a.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    Path(a.out).write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
