"""Benchmark: supervised tokens/s of our stage-2 train step vs transformers' LlavaForConditionalGeneration.

Same model sizes (~19M parameters: Llama hidden 384 x 7 layers, vocab 8000; CLIP 112 px / patch 14,
64 feature tokens per image, mlp2x_gelu projector; vision tower frozen as in stage 2), same synthetic
LLaVA-like skewed samples (90% with an image, long-tailed text), same optimizer (fused AdamW, the
default ``optim`` of transformers' Trainer on torch >= 2.8, so of both trainers), fp32, sdpa.

- ``hf``: LlavaForConditionalGeneration with a TRL-style collator: the processor has already expanded
  each image into 64 image tokens, labels are -100 on prompt / image / padding; plain loop step
  (forward, backward, optimizer step), batches of ``--batch`` samples in random order.
- ``ours``: LlavaLlamaForCausalLM, DataCollator batches (one placeholder per image, merged in the model),
  the same batches.
- ``ours_sdpa_varlen`` (with sdpa_varlen in ``--attn``): the ``ours`` batches under sdpa_varlen, which
  trains padded rows as one row of their real tokens.
- ``ours_packed``: the same samples packed (first-fit-decreasing, ``--max-length``) into ``--rows`` rows
  per step, PackingCollator batches with seq_ids, sdpa with the [b, 1, T, T] block-diagonal mask.
- ``ours_packed_<attn>``: the same packed batches with another ``model.attn_implementation`` (same
  weights): sdpa_varlen (the rows end to end without padding, one causal sdpa per sample, no mask),
  eager (additive mask),
  flex_attention (document-causal BlockMask), flash_attention_2 (varlen from the restarting position ids).
  A path that cannot train here is listed under ``skipped`` with the reason (flex: no CPU backward in
  torch; flash: needs flash-attn and CUDA).
- ``ours_packed_compiled`` (``--compile``): ``ours_packed`` with the decoder under ``torch.compile``
  (dynamic shapes); ``compile_cpu_s`` is the CPU time of its first epoch (every shape compiled once).

Each variant trains one "epoch" over the same samples; variants are interleaved, after a warm-up step
each, in rounds until every variant's ratio to hf (CPU time) agrees within ``--tolerance`` (10 %) between
the last two rounds (at least ``--repeats``, at most ``--max-repeats`` rounds); figures are medians over
the rounds. tokens/s = supervised tokens of the epoch / epoch time; ``vs_hf`` compares wall-clock
medians, ``vs_hf_cpu`` medians of this process's CPU time (time.process_time: the machine is shared, and
CPU time does not count the time other processes hold the cores). ``input_tokens`` counts input_ids
elements (ours: before the merge expands each image placeholder into 64 tokens).

    .venv/bin/python benchmarks/bench_train_step.py [--samples 16 --repeats 3] [--attn sdpa,eager] [--quick]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import table, write
from synthetic import Mix, samples

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.data.collator import DataCollator
from llava_train.data.packing import PackingCollator, pack_lengths
from llava_train.model import ModelConfig, build_model
from llava_train.model.builder import check_attn_implementation

VOCAB, IMAGE_SIDE, PATCH = 8000, 112, 14
PACKED_ATTN = ("sdpa", "sdpa_varlen", "eager", "flex_attention", "flash_attention_2")
SIZES = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=7, num_attention_heads=6)
QUICK_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
VISION = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=14
)


class _Vocab:
    """Stands in for a tokenizer: only its length (the vocabulary size) is read by build_model."""

    def __len__(self) -> int:
        return VOCAB


def build_ours(sizes: dict, max_length: int, attn: str = "sdpa"):
    torch.manual_seed(0)  # the same weights for every attention implementation
    cfg = ModelConfig(
        attn_implementation=attn,
        preset="tiny",
        num_key_value_heads=sizes["num_attention_heads"],
        vision_config=dict(VISION, image_size=IMAGE_SIDE),
        mm_projector_type="mlp2x_gelu",
        image_aspect_ratio="pad",
        mm_patch_merge_type="flat",
        model_max_length=max_length,
        **sizes,
    )
    model = build_model(cfg, _Vocab()).train()
    model.get_model().get_vision_tower().requires_grad_(False)  # stage 2: tower frozen
    return model


def build_hf(sizes: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        vocab_size=VOCAB,
        num_key_value_heads=sizes["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        **sizes,
    )
    vision = CLIPVisionConfig(image_size=IMAGE_SIDE, projection_dim=64, **VISION)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=VOCAB - 1,
        image_seq_length=(IMAGE_SIDE // PATCH) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = "sdpa"
    model = LlavaForConditionalGeneration(config).train()
    model.model.vision_tower.requires_grad_(False)
    return model


def hf_collate(batch: list[dict], image_tokens: int) -> dict:
    """TRL-style: image placeholder expanded to ``image_tokens`` image-token ids, labels -100 there."""
    ids, labels = [], []
    for s in batch:
        is_img = s["input_ids"] == IMAGE_TOKEN_INDEX
        reps = torch.where(is_img, image_tokens, 1)  # [s]
        ids.append(s["input_ids"].masked_fill(is_img, VOCAB - 1).repeat_interleave(reps))
        labels.append(s["labels"].masked_fill(is_img, IGNORE_INDEX).repeat_interleave(reps))
    width = max(len(x) for x in ids)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    label_t = torch.full((len(batch), width), IGNORE_INDEX)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)], label_t[i, : len(y)], mask[i, : len(x)] = x, y, 1
    images = [s["images"] for s in batch if s["images"] is not None]
    out = dict(input_ids=input_ids, labels=label_t, attention_mask=mask)
    if images:
        out["pixel_values"] = torch.cat(images)  # [n_img, 3, S, S]
    return out


def strip(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "sample_ids"}


def make_step(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # both trainers' default: adamw_torch_fused

    def step(batch: dict) -> None:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)


def epochs(data: list[dict], batch: int, rows: int, max_length: int, seed: int) -> dict[str, list[dict]]:
    """The batches of one epoch per variant, collated up front (collation is not timed)."""
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    plain = [[data[i] for i in order[k : k + batch]] for k in range(0, len(order), batch)]
    packs = pack_lengths(
        [s["length"] for s in data], max_length, [int(s["images"] is not None) for s in data]
    )
    random.Random(seed).shuffle(packs)
    packed = [[[data[i] for i in p] for p in packs[k : k + rows]] for k in range(0, len(packs), rows)]
    tokens = (IMAGE_SIDE // PATCH) ** 2
    return {
        "hf": [hf_collate(b, tokens) for b in plain],
        "ours": [strip(DataCollator(0)(b)) for b in plain],
        "ours_packed": [strip(PackingCollator(0, max_length)(b)) for b in packed],
    }


def padded_tokens(batches: list[dict], key: str) -> int:
    return sum(int(b[key].numel()) for b in batches)


def cannot_train(attn: str) -> str | None:
    """Why a packed train step under ``attn`` cannot run on this machine (CPU), or None."""
    try:
        check_attn_implementation(attn)
    except ValueError as err:
        return str(err)
    if attn == "flex_attention":
        return f"FlexAttention has no CPU backward in torch {torch.__version__}"
    return None


def run_rounds(steps: dict, runs: dict, repeats: int, max_repeats: int, tolerance: float) -> tuple:
    """Interleaved epochs until each variant's CPU-time ratio to hf is stable; (wall, cpu) per variant."""
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for rounds in range(1, max_repeats + 1):
        for name, batches in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for b in batches:
                steps[name][0](b)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        if rounds >= max(repeats, 2) and _agree(cpu, tolerance):
            break
    return wall, cpu, _agree(cpu, tolerance)


def _agree(cpu: dict[str, list[float]], tolerance: float) -> bool:
    ratios = {k: [h / t for h, t in zip(cpu["hf"], v)] for k, v in cpu.items()}  # per round, vs hf
    return all(abs(r[-1] - r[-2]) <= tolerance * max(r[-1], r[-2]) for r in ratios.values())


def main(
    n: int = 16,
    batch: int = 8,
    rows: int = 4,
    max_length: int = 512,
    repeats: int = 3,
    quick=False,
    attns: tuple[str, ...] = PACKED_ATTN,
    max_repeats: int = 8,
    tolerance: float = 0.10,
    compile_decoder: bool = False,
) -> dict:
    torch.manual_seed(0)
    sizes = QUICK_SIZES if quick else SIZES
    mix = Mix(image_tokens=(IMAGE_SIDE // PATCH) ** 2, image_text_median=80, text_only_median=250, hi=440)
    data = samples(n, mix, VOCAB - 1, IMAGE_SIDE, seed=0, max_length=max_length)
    supervised = sum(int((s["labels"][1:] != IGNORE_INDEX).sum()) for s in data)
    runs = epochs(data, batch, rows, max_length, seed=0)
    models = {"hf": build_hf(sizes), "ours": build_ours(sizes, max_length)}
    steps = {"hf": make_step(models["hf"]), "ours": make_step(models["ours"])}
    steps["ours_packed"] = steps["ours"]
    skipped = {}
    for attn in attns:
        if attn == "sdpa":
            continue
        reason = cannot_train(attn)
        if reason:
            skipped[f"ours_packed_{attn}"] = reason
            continue
        runs[f"ours_packed_{attn}"] = runs["ours_packed"]
        steps[f"ours_packed_{attn}"] = make_step(build_ours(sizes, max_length, attn))
        if attn == "sdpa_varlen":  # padded rows train padding-free too
            runs["ours_sdpa_varlen"], steps["ours_sdpa_varlen"] = runs["ours"], steps[f"ours_packed_{attn}"]
    compile_s = None
    if compile_decoder:  # the decoder only: the merge before it has data-dependent shapes
        compiled = build_ours(sizes, max_length)
        compiled.get_model().compile(dynamic=True)  # packed row lengths change every step
        runs["ours_packed_compiled"] = runs["ours_packed"]
        steps["ours_packed_compiled"] = make_step(compiled)
        start = time.process_time()
        for b in runs["ours_packed"]:  # every shape of the epoch once: compiles, then one step each
            steps["ours_packed_compiled"][0](b)
        compile_s = round(time.process_time() - start, 1)
    if "sdpa" not in attns:
        del runs["ours_packed"]
    for name, batches in runs.items():  # warm-up
        steps[name][0](batches[0])
    wall, cpu, stable = run_rounds(steps, runs, repeats, max_repeats, tolerance)
    results = []
    for name, batches in runs.items():
        t, c = statistics.median(wall[name]), statistics.median(cpu[name])
        results.append(
            dict(
                variant=name,
                steps=len(batches),
                params=steps[name][1],
                trainable=steps[name][2],
                input_tokens=padded_tokens(batches, "input_ids"),
                epoch_s=round(t, 2),
                epoch_cpu_s=round(c, 2),
                supervised_tok_s=round(supervised / t, 1),
                supervised_tok_per_cpu_s=round(supervised / c, 1),
                cpu_s_per_round=[round(x, 2) for x in cpu[name]],
            )
        )
    base, base_cpu = results[0]["supervised_tok_s"], results[0]["supervised_tok_per_cpu_s"]
    for r in results:
        r["vs_hf"] = round(r["supervised_tok_s"] / base, 2)  # wall clock, medians
        r["vs_hf_cpu"] = round(r["supervised_tok_per_cpu_s"] / base_cpu, 2)  # CPU time: robust to other load
    cols = ["variant", "steps", "input_tokens", "epoch_s", "epoch_cpu_s", "supervised_tok_s", "vs_hf"]
    print(table(results, cols + ["vs_hf_cpu"]))
    rounds = len(cpu["hf"])
    print(f"{rounds} rounds; last two within {tolerance:.0%}: {stable}")
    if compile_s is not None:
        print(f"torch.compile warm-up epoch (compiles every shape): {compile_s} s CPU")
    for name, reason in skipped.items():
        print(f"skipped {name}: {reason}")
    config = dict(
        samples=n, batch=batch, rows=rows, max_length=max_length, repeats=repeats, sizes=sizes, attns=attns
    )
    write(
        "train_step_quick" if quick else "train_step",
        dict(
            config=config,
            supervised_tokens=supervised,
            rounds=rounds,
            stable_within_tolerance=stable,
            tolerance=tolerance,
            results=results,
            skipped=skipped,
            compile_cpu_s=compile_s,
        ),
    )
    return {"results": results, "skipped": skipped}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-repeats", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.10, help="ratio agreement of the last 2 rounds")
    parser.add_argument("--attn", default=",".join(PACKED_ATTN), help="packed attention paths to time")
    parser.add_argument("--compile", action="store_true", help="also time the packed step, decoder compiled")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    a = parser.parse_args()
    attns = tuple(a.attn.split(","))
    main(
        a.samples,
        a.batch,
        a.rows,
        a.max_length,
        a.repeats,
        a.quick,
        attns,
        a.max_repeats,
        a.tolerance,
        a.compile,
    )
