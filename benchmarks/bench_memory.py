"""Benchmark: peak memory (RSS) of stage 1 (projector), LoRA and full stage 2, on the tiny and a ~100M model.

One fresh subprocess per case (so the high-water mark is that case's own): build the model, apply the stage
with the trainer's ``apply_stage`` (LoRA r=128 on the decoder linears, as the finetune_lora preset), AdamW,
``--steps`` train steps (fp32, sdpa) on batches of 4 synthetic samples (one 56 px image = 16 tokens,
long-tailed text, <= 512 tokens). Reported: peak RSS (VmHWM), RSS after imports, after building the model,
and parameter counts.

    .venv/bin/python benchmarks/bench_memory.py [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from common import ROOT, table, write

MODELS = {
    "tiny": {},
    "100m": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=12, num_attention_heads=10),
}
STAGES = ("pretrain", "finetune_lora", "finetune")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(model_name: str, stage: str, steps: int) -> dict:
    """Run one case in this process; return its figures."""
    import torch
    from synthetic import Mix, samples

    from llava_train.config import StageConfig
    from llava_train.data.collator import DataCollator
    from llava_train.model import ModelConfig, build_model
    from llava_train.train.stages import apply_stage

    torch.manual_seed(0)
    after_import = _status_mb("VmRSS")
    sizes = MODELS[model_name]
    heads = sizes.get("num_attention_heads")
    cfg = ModelConfig(
        preset="tiny",
        image_aspect_ratio="pad",
        mm_patch_merge_type="flat",
        model_max_length=512,
        num_key_value_heads=heads,
        **sizes,
    )
    model = build_model(cfg).train()
    after_build = _status_mb("VmRSS")
    model = apply_stage(model, StageConfig(name=stage, pretrain_mm_mlp_adapter=None))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    data = samples(
        4 * steps, Mix(image_tokens=16, image_text_median=200, text_only_median=300, hi=490), 32000, 56
    )
    collate = DataCollator(0)
    for k in range(steps):
        batch = collate(data[4 * k : 4 * k + 4])
        batch.pop("sample_ids")
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return dict(
        model=model_name,
        stage=stage,
        params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        trainable_m=round(sum(p.numel() for p in params) / 1e6, 2),
        rss_after_import_mb=round(after_import, 1),
        rss_after_build_mb=round(after_build, 1),
        peak_rss_mb=round(_status_mb("VmHWM"), 1),
        peak_over_import_mb=round(_status_mb("VmHWM") - after_import, 1),
    )


def main(steps: int = 2, models: tuple[str, ...] = ("tiny", "100m")) -> dict:
    results = []
    # The caller's PYTHONPATH stays after ours (packages installed with pip --target, say).
    path = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    for model_name in models:
        for stage in STAGES:
            cmd = [sys.executable, __file__, "--child", model_name, stage, "--steps", str(steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode:
                raise RuntimeError(f"{model_name}/{stage} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    cols = [
        "model",
        "stage",
        "params_m",
        "trainable_m",
        "rss_after_build_mb",
        "peak_rss_mb",
        "peak_over_import_mb",
    ]
    print(table(results, cols))
    write("memory", dict(config=dict(steps=steps, batch=4, max_length=512), results=results))
    return {"results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "STAGE"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--models", default="tiny,100m")
    a = parser.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.steps)))
    else:
        main(a.steps, tuple(a.models.split(",")))
    sys.stdout.flush()
