"""Benchmark: vectorised multimodal merge vs the loop reference (tests/reference_merge.py), same process.

Batch 16 on a tiny-LLM (hidden 64) LLaVA so the merge itself dominates; features are precomputed
(the image encoder is not timed). Cases: 576-token features per image (P=24, as CLIP-L/14-336), and
anyres spatial_unpad features. Writes benchmarks/out/merge.json.

    .venv/bin/python benchmarks/bench_merge.py
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from llava_train.model import ModelConfig, build_model  # noqa: E402
from llava_train.model.anyres import get_anyres_image_grid_shape  # noqa: E402
from tests import reference_merge  # noqa: E402

BATCH, REPEATS = 16, 10


def build(aspect: str, merge: str):
    cfg = ModelConfig(
        preset="tiny",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        vision_config=dict(image_size=336, patch_size=14, hidden_size=32, num_hidden_layers=1),
        image_aspect_ratio=aspect,
        mm_patch_merge_type=merge,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        model_max_length=16384,
    )
    return build_model(cfg).eval()


def batch(rng: random.Random, model, anyres: bool):
    rows, crops, sizes = [], [], []
    for _ in range(BATCH):
        n_img = rng.choice([0, 1, 1, 2])
        row = [1]
        for _ in range(n_img):
            row += [rng.randint(3, 900) for _ in range(rng.randint(5, 40))] + [IMAGE_TOKEN_INDEX]
            size = (rng.randint(200, 1400), rng.randint(200, 1400))
            num_w, num_h = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, 336)
            crops.append(1 + num_w * num_h if anyres else 1)
            sizes.append(size)
        rows.append(row + [rng.randint(3, 900) for _ in range(rng.randint(20, 200))])
    width = max(map(len, rows))
    ids = torch.zeros(BATCH, width, dtype=torch.long)
    mask = torch.zeros(BATCH, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), True
    labels = ids.masked_fill(~mask | (ids == IMAGE_TOKEN_INDEX), IGNORE_INDEX)
    return ids, mask, labels, crops, sizes


def patch_encoder(model, crops_total: int):
    """Replace the tower+projector by precomputed [crops, 576, h] features (encoding is not timed)."""
    features = torch.randn(crops_total, 576, model.config.hidden_size)
    model.encode_images = lambda images: features[: images.shape[0]]


def timed(fn) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(REPEATS):
        fn()
    return (time.perf_counter() - start) / REPEATS * 1e3


def run_case(name: str, aspect: str, merge: str, anyres: bool, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build(aspect, merge)
    ids, mask, labels, crops, sizes = batch(random.Random(seed), model, anyres)
    patch_encoder(model, sum(crops))
    images = [torch.zeros(c, 3, 1, 1) for c in crops] if anyres else torch.zeros(len(crops), 3, 1, 1)
    args = (ids, None, mask, None, labels, images, sizes)
    with torch.no_grad():
        ours = model.prepare_inputs_labels_for_multimodal(*args)
        ref = reference_merge.reference_merge(model, ids, None, mask, labels, images, sizes)
        assert torch.equal(ours[4], ref[4]) and torch.equal(ours[5], ref[5]), name
        t_vec = timed(lambda: model.prepare_inputs_labels_for_multimodal(*args))
        t_ref = timed(lambda: reference_merge.reference_merge(model, ids, None, mask, labels, images, sizes))
    return dict(
        case=name,
        batch=BATCH,
        images=len(crops),
        out_tokens=int(ours[4].shape[1]),
        vectorised_ms=round(t_vec, 3),
        reference_ms=round(t_ref, 3),
        speedup=round(t_ref / t_vec, 2),
    )


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [
        run_case("pad/flat P=24 (576 tokens/image)", "pad", "flat", anyres=False),
        run_case("anyres/spatial_unpad P=24", "anyres", "spatial_unpad", anyres=True),
        run_case("anyres/flat P=24", "anyres", "flat", anyres=True),
    ]
    print(f"{'case':38s} {'imgs':>4s} {'T':>6s} {'vec ms':>8s} {'loop ms':>8s} {'ratio':>6s}")
    for r in results:
        print(
            f"{r['case']:38s} {r['images']:4d} {r['out_tokens']:6d} {r['vectorised_ms']:8.2f} "
            f"{r['reference_ms']:8.2f} {r['speedup']:6.2f}x"
        )
    out = ROOT / "benchmarks" / "out"
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), device="cpu", repeats=REPEATS)
    (out / "merge.json").write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    print(f"wrote {out / 'merge.json'}")


if __name__ == "__main__":
    main()
