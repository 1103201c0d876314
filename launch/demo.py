"""`make demo`: the whole LLaVA recipe on the bundled handwritten-digit data, on a CPU, offline.

    python launch/demo.py [--out runs/demo] [--data data/demo] [--quick] [--seed 0]

0. a random tiny base model (Llama decoder + CLIP tower + projector) stands in for vicuna + CLIP
0b. the random tower is pretrained on the training digits' caption pairs (data/demo/tower_pairs.json),
    standing in for CLIP's image-text pretraining (llava_train/train/tower_pretrain.py); then frozen
0c. meanwhile, in a second process, the random LLM is pretrained on worked sums (data/demo/llm_texts.json),
    standing in for the LLM's own pretraining, where Vicuna learned to add (llava_train/train/llm_pretrain.py)
1. stage 1 (pretrain): the projector learns from caption pairs (LLM and tower frozen)
2. stage 2 (finetune): the LLM and the projector from the base and the stage-1 projector, as LLaVA-1.5
3. export to the transformers-native LlavaNext format
4. evaluate the exported model on the held-out questions (images never seen in training)

Every step runs in this process and logs its equivalent command: training is launch/train.py's
`train` on the config that command composes, the other steps are the library calls behind
launch/export.py and launch/eval.py (one process imports transformers once, not once per stage).
Outputs: <out>/metrics.json (with `overall`), a grid of held-out answers <out>/samples.png, loss
curves <out>/stage{1,2}/loss_curve.png, the answers, and every model directory.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SEED = 0
# The demo model (conf/model/demo.yaml) and its two schedules (conf/schedule/demo_stage{1,2}.yaml): each
# train command below is `launch/train.py stage=... model=demo schedule=...` plus the paths of this run.
DEMO = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "demo.yaml"))
TOKENIZER, TEMPLATE = DEMO["tokenizer"], DEMO["data"]["template"]
# Steps 0b and 0c, the tower's and the LLM's stand-ins for their own pretraining (conf/demo/pretrain.yaml).
PRETRAIN = OmegaConf.to_container(OmegaConf.load(CONF / "demo" / "pretrain.yaml"))
TOWER, LLM = PRETRAIN["tower"], PRETRAIN["llm"]
# One compute thread per process: the demo's matrices are tiny, and a second OpenMP thread only waits
# for a core (on a busy 2-core machine a step was 22x slower with two); the second core decodes images
# in the data loader's worker (the schedules' data.num_workers=1). docs/DEMO_HISTORY.md has the runs.
THREADS = "1"
QUICK_STEPS = 3  # --quick: a smoke run of every step (tests/test_demo.py)
QUICK = [f"training.max_steps={QUICK_STEPS}"]

log = logging.getLogger("demo")


def build_base(out: Path, data: Path, quick: bool, seed: int = SEED) -> dict:
    """Steps 0, 0b and 0c: the random tiny base model, its tower and its LLM pretrained side by side.

    The random model is saved first; a second process pretrains its LLM on the worked sums
    (data/demo/llm_texts.json) while this one pretrains the tower on the caption pairs, one core
    each. Saved with its tokenizer like a pretrained checkpoint; returns both pretraining reports.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from llava_train.data import load_tokenizer
    from llava_train.data.image import build_image_processor
    from llava_train.model import ModelConfig, build_model
    from llava_train.train.llm_pretrain import LlmPretrainConfig, load_decoder_weights, pretrain_saved_llm
    from llava_train.train.tower_pretrain import (
        TowerPretrainConfig,
        load_caption_pairs,
        pretrain_vision_tower,
    )

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(TOKENIZER)
    model = build_model(ModelConfig(**DEMO["model"]), tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    texts, weights = data / "llm_texts.json", out / "llm_pretrain.safetensors"
    llm_cfg = LlmPretrainConfig(**{**LLM, "seed": seed}, max_steps=QUICK_STEPS if quick else None)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        log.info("0c/4 LLM pretraining on %s in a second process (stands in for the LLM's own)", texts)
        llm_job = pool.submit(pretrain_saved_llm, out, texts, weights, llm_cfg)
        log.info("0b/4 vision tower pretraining on %s (stands in for CLIP's)", data / "tower_pairs.json")
        tower = model.get_vision_tower()
        pixels, captions = load_caption_pairs(
            data / "tower_pairs.json", data / "images", build_image_processor(tower.image_size)
        )
        cfg = TowerPretrainConfig(**{**TOWER, "epochs": 1 if quick else TOWER["epochs"], "seed": seed})
        report = {"tower": pretrain_vision_tower(tower, pixels, captions, cfg), "llm": llm_job.result()}
    load_decoder_weights(model, weights)
    weights.unlink()
    model.save_pretrained(out)
    (out / "pretrain.json").write_text(json.dumps(report, indent=1))
    return report


@functools.cache
def launch_train():
    """launch/train.py as a module (launch/ is not a package): its ``train`` runs one stage."""
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(stage: str, schedule: str, data: str, run_dir: Path, model_dir: Path, extra: list[str]) -> None:
    """`python launch/train.py stage=... model=demo schedule=... <paths>`, run in this process."""
    from llava_train.config import compose_config

    overrides = [f"stage={stage}", "model=demo", f"schedule={schedule}", f"data={data}",
                 f"model.llm_path={model_dir}", f"training.run_dir={run_dir}", *extra]  # fmt: skip
    log.info("$ python launch/train.py %s", " ".join(overrides))
    launch_train().train(compose_config(overrides))
    gc.collect()  # the finished stage's trainer, model and loader sit in reference cycles until a full pass


def summarise(metrics: dict, out: Path) -> None:
    """Print accuracy per question type, single-digit and composite (anyres) questions apart."""
    per = metrics.get("per_category") or {}
    rows = [(name, v["accuracy"] if isinstance(v, dict) else v, v.get("n", "") if isinstance(v, dict) else "")
            for name, v in sorted(per.items())]  # fmt: skip
    print("\nheld-out accuracy (images never seen in training)")
    print(f"{'question type':<16}{'accuracy':>10}{'n':>6}")
    for name, acc, n in rows:
        print(f"{name:<16}{acc:>10.3f}{n!s:>6}")
    for key in ("single_digit", "composite"):
        if metrics.get(key) is not None:  # a group with no questions is absent
            print(f"{key:<16}{metrics[key]:>10.3f}")
    print(f"{'overall':<16}{metrics['overall']['accuracy']:>10.3f}{metrics['overall']['n']:>6}")
    print(f"\nmetrics: {out / 'metrics.json'}; held-out samples: {out / 'samples.png'}")
    print(f"loss curves: {out}/stage1/loss_curve.png, {out}/stage2/loss_curve.png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", type=Path)
    parser.add_argument("--data", default="data/demo", type=Path)
    parser.add_argument("--quick", action="store_true", help="3 steps per stage (smoke test)")
    parser.add_argument("--seed", type=int, default=SEED, help="model init, tower pretraining and training")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", THREADS)  # before torch is imported
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out, data = args.out.resolve(), args.data.resolve()
    run_args = [*(QUICK if args.quick else []), f"training.seed={args.seed}"]
    if not (data / "stage2.json").is_file():
        sys.exit(f"no demo data under {data}: run `make data` (python data/build_demo.py --out {data})")
    start = time.perf_counter()

    log.info("0/4 random tiny base model -> %s", out / "base")
    pretrain = build_base(out / "base", data, args.quick, args.seed)

    log.info("1/4 stage 1: the projector on caption pairs (LLM and tower frozen)")
    data_args = [f"data.data_path={data / 'stage1.json'}", f"data.image_folder={data / 'images'}"]
    train("pretrain", "demo_stage1", "demo_pretrain", out / "stage1", out / "base", [*data_args, *run_args])

    log.info("2/4 stage 2: the LLM and the projector on instruction conversations")
    data_args = [f"data.data_path={data / 'stage2.json'}", f"data.image_folder={data / 'images'}"]
    projector = f"stage.pretrain_mm_mlp_adapter={out / 'stage1' / 'mm_projector.safetensors'}"
    train("finetune", "demo_stage2", "demo", out / "stage2", out / "base", [projector, *data_args, *run_args])

    from llava_train.data import load_tokenizer
    from llava_train.eval.run import run_eval
    from llava_train.export import export_hf, load_original

    log.info("3/4 $ python launch/export.py op=hf model_dir=%s tokenizer=%s out_dir=%s",
             out / "stage2", TOKENIZER, out / "hf")  # fmt: skip
    export_hf(load_original(out / "stage2"), load_tokenizer(TOKENIZER), out / "hf", template=TEMPLATE)

    log.info("4/4 $ python launch/eval.py model_dir=%s ...", out / "hf")
    metrics = run_eval(
        model_dir=str(out / "hf"),
        question_file=str(data / "eval" / "questions.jsonl"),
        image_folder=str(data / "images"),
        answers_file=str(out / "answers.jsonl"),
        ground_truth=str(data / "eval" / "answers.jsonl"),
        template=TEMPLATE,
        batch_size=32,
        max_new_tokens=24,  # the longest worked sum, "9 + 9 + 9 + 9 = 36", is 15 tokens
        metrics_file=str(out / "metrics.json"),
    )
    metrics.update(
        composite_split(metrics),
        tower_pretrain={
            k: pretrain["tower"][k] for k in ("train_accuracy", "val_accuracy", "n_val", "seconds")
        },
        llm_pretrain={k: pretrain["llm"][k] for k in ("accuracy", "steps", "seconds")},
        wall_seconds=round(time.perf_counter() - start, 1),
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    from llava_train.eval.samples import plot_samples

    plot_samples(data / "eval" / "questions.jsonl", out / "answers.jsonl", data / "eval" / "answers.jsonl",
                 data / "images", out / "samples.png")  # fmt: skip
    summarise(metrics, out)
    print(f"demo wall time {metrics['wall_seconds']:.0f} s")
    hf, first = out / "hf", json.loads((data / "eval" / "questions.jsonl").read_text().splitlines()[0])
    image = data / "images" / first["image"]
    print(
        f"\nask the trained model about a held-out image (then type e.g. {first['text'].splitlines()[0]!r}):"
    )
    print(f"  python launch/chat.py model_dir={hf} template={TEMPLATE} image={image}")
    print(
        f"  python launch/serve.py model_dir={hf} template={TEMPLATE}   # a web page and an API on http://127.0.0.1:8000"
    )


SINGLE_DIGIT = ("digit", "parity", "compare")


def composite_split(metrics: dict) -> dict:
    """Accuracy over single-digit question types and over composite (multi-digit, anyres) ones."""
    per = metrics.get("per_category") or {}
    groups: dict[str, list[tuple[float, int]]] = {"single_digit": [], "composite": []}
    for name, v in per.items():
        groups["single_digit" if name in SINGLE_DIGIT else "composite"].append((v["accuracy"], v["n"]))
    return {
        key: sum(a * n for a, n in vals) / max(1, sum(n for _, n in vals))
        for key, vals in groups.items()
        if vals
    }


if __name__ == "__main__":
    main()
