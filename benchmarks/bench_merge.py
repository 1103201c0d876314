"""Benchmark: vectorised multimodal merge vs the loop reference (tests/reference_merge.py), same process.

Batch 16 on a tiny-LLM (hidden 64) LLaVA so the merge itself dominates; features are precomputed
(the image encoder is not timed). Cases: 576-token features per image (P=24, as CLIP-L/14-336), and
anyres (spatial_unpad / flat) features. Outputs are checked identical first; then both paths run
interleaved after a warm-up, and min / median of the repeats are reported. Writes benchmarks/out/merge.json.

    .venv/bin/python benchmarks/bench_merge.py [--repeats 15] [--profile]
"""

from __future__ import annotations

import argparse
import random

import torch
from common import interleaved, table, write

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.model import ModelConfig, build_model
from llava_train.model.anyres import get_anyres_image_grid_shape
from tests import reference_merge

BATCH = 16
CASES = [
    ("pad/flat P=24 (576 tokens/image)", "pad", "flat", False),
    ("anyres/spatial_unpad P=24", "anyres", "spatial_unpad", True),
    ("anyres/flat P=24", "anyres", "flat", True),
]


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
    """16 rows of 0-2 images (random sizes 200-1400 px), 5-40 prompt and 20-200 reply tokens."""
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


def patch_encoder(model, crops_total: int) -> None:
    """Replace the tower+projector by precomputed [crops, 576, h] features (encoding is not timed)."""
    features = torch.randn(crops_total, 576, model.config.hidden_size)
    model.encode_images = lambda images: features[: images.shape[0]]


def run_case(name: str, aspect: str, merge: str, anyres: bool, repeats: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build(aspect, merge)
    ids, mask, labels, crops, sizes = batch(random.Random(seed), model, anyres)
    patch_encoder(model, sum(crops))
    images = [torch.zeros(c, 3, 1, 1) for c in crops] if anyres else torch.zeros(len(crops), 3, 1, 1)
    args = (ids, None, mask, None, labels, images, sizes)

    def ours():
        return model.prepare_inputs_labels_for_multimodal(*args)

    def loop():
        return reference_merge.reference_merge(model, ids, None, mask, labels, images, sizes)

    with torch.no_grad():
        a, r = ours(), loop()
        identical = torch.equal(a[4], r[4]) and torch.equal(a[5], r[5])
        if not identical:
            raise AssertionError(f"{name}: vectorised merge differs from the loop reference")
        t = interleaved({"vectorised": ours, "loop": loop}, repeats=repeats, warmup=2)
    return dict(
        case=name,
        batch=BATCH,
        images=len(crops),
        out_tokens=int(a[4].shape[1]),
        identical=identical,
        vectorised_min_ms=t["vectorised"]["min_ms"],
        vectorised_median_ms=t["vectorised"]["median_ms"],
        loop_min_ms=t["loop"]["min_ms"],
        loop_median_ms=t["loop"]["median_ms"],
        speedup_median=round(t["loop"]["median_ms"] / t["vectorised"]["median_ms"], 1),
        speedup_min=round(t["loop"]["min_ms"] / t["vectorised"]["min_ms"], 1),
    )


def profile_case(aspect: str, merge: str, anyres: bool) -> str:
    """torch.profiler table of one vectorised merge (top ops by self CPU time)."""
    from torch.profiler import profile

    model = build(aspect, merge)
    ids, mask, labels, crops, sizes = batch(random.Random(0), model, anyres)
    patch_encoder(model, sum(crops))
    images = [torch.zeros(c, 3, 1, 1) for c in crops] if anyres else torch.zeros(len(crops), 3, 1, 1)
    with torch.no_grad():
        model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images, sizes)
        with profile() as prof:
            model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images, sizes)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)


def main(repeats: int = 15, profile: bool = False) -> dict:
    # One thread: the merge is small memory-bound ops; on a shared 2-core box two threads made single
    # repeats vary 10x (intra-op workers preempted by other processes), for both paths.
    torch.set_num_threads(1)
    results = [run_case(name, a, m, ar, repeats) for name, a, m, ar in CASES]
    cols = ["case", "images", "out_tokens", "vectorised_median_ms", "loop_median_ms", "speedup_median"]
    print(table(results, cols + ["speedup_min"]))
    if profile:
        print(profile_case("anyres", "spatial_unpad", True))
    write("merge", dict(repeats=repeats, results=results))
    return {"results": results}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    main(args.repeats, args.profile)
