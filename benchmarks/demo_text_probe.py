"""How fast does the demo's random LLM learn the composite skills from text alone? (docs/DEMO_HISTORY.md)

    .venv/bin/python benchmarks/demo_text_probe.py [--seconds 90 | --steps 600] [--layers 4 --hidden 128
        --heads 4] [--batch 16 --lr 1e-3 --init 0.1] [--format chat|short] [--rounds 0 --text-first 0.5]
                                                            # -> benchmarks/out/demo_text_probe.json

No image is involved: the demo's stage-2 questions are asked about random digits written as text
(``llm_text_records`` in data/build_demo.py; a strip is one row, a 2x2 grid two), to a random Llama with
the Mistral tokenizer (by default width 128 and 4 layers; the demo's LLM is ``--hidden 64 --layers 6``).
It trains for a fixed wall time or number of steps (answer tokens only, AdamW, warm-up then cosine),
then scores 300 held-out one-question conversations, the digits before the question as the demo's
held-out images are: a conversation counts as right when every answer token is the argmax (what greedy
decoding returns). ``--rounds`` (questions per training conversation, 0: one to all of them) and
``--text-first`` (share with the digits before the question) shape the training conversations as
``data/build_demo.py --rounds / --image-first`` shape the demo's. It isolates the LLM: how fast it
learns to read, locate and add digits given exact text.

``--format chat`` is the demo's vicuna_v1 prompt (system line, the short-answer instruction on every
question); ``short`` drops the system line and the instruction (fewer tokens per answer).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import random
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from common import ROOT, write

from llava_train.data.conversation import get_template

SYSTEM = get_template("vicuna_v1").system  # the demo's stage-2 template


def _build_demo():
    spec = importlib.util.spec_from_file_location("build_demo", ROOT / "data" / "build_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def category(question: str) -> str:
    for key, name in (("sum", "sum"), ("Read", "read"), ("leftmost", "leftmost"), ("rightmost", "rightmost")):
        if key in question:
            return name
    if "How many" in question:
        return "count"
    return "grid_position" if "-" in question else "single_digit"


def encode(record: dict, tokenizer, fmt: str, short_answer: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation in the vicuna_v1 layout; only the replies (+ EOS) are supervised."""
    ids, labels = [tokenizer.bos_token_id], [-100]

    def add(text: str, supervised: bool) -> None:
        tokens = tokenizer(text, add_special_tokens=False).input_ids
        ids.extend(tokens)
        labels.extend(tokens if supervised else [-100] * len(tokens))

    if fmt == "chat":
        add(SYSTEM + " ", False)
    turns = record["conversations"]
    for question, answer in zip(turns[::2], turns[1::2]):
        text = question["value"] if fmt == "chat" else question["value"].replace(short_answer, "")
        add(f"USER: {text} ASSISTANT:", False)
        add(f" {answer['value']}", True)
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


def batchify(items: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, ...]:
    width = max(len(ids) for ids, _ in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), -100)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for k, (row, lab) in enumerate(items):
        ids[k, : len(row)], labels[k, : len(lab)], mask[k, : len(row)] = (
            torch.tensor(row),
            torch.tensor(lab),
            1,
        )
    return ids, labels, mask


def first_turn_right(pred: torch.Tensor, target: torch.Tensor, eos: int) -> bool:
    """Every supervised token of the first reply (up to and including its EOS) predicted."""
    for p in (target != -100).nonzero().flatten().tolist():
        if pred[p] != target[p]:
            return False
        if target[p] == eos:
            return True
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--format", choices=["chat", "short"], default="chat")
    parser.add_argument("--init", type=float, default=0.1, help="initializer_range of the random LLM")
    parser.add_argument("--rounds", type=int, default=0, help="questions per conversation (0: 1 to all)")
    parser.add_argument(
        "--text-first", type=float, default=0.5, help="share of digits written before the question"
    )
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of --seconds")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from llava_train.data import load_tokenizer

    demo = _build_demo()
    tokenizer = load_tokenizer("mistral")
    torch.manual_seed(0)
    config = LlamaConfig(  # the tiny preset's LLM, init 0.1 as launch/demo.py
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.6875),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=len(tokenizer),
        initializer_range=args.init,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    held_out = demo.llm_text_records(300, random.Random(999), 1, 1.0)
    test = [encode(r, tokenizer, args.format, demo.SHORT_ANSWER) for r in held_out]
    rng, steps, start = random.Random(0), 0, time.perf_counter()

    def progress(elapsed: float) -> float:
        return steps / args.steps if args.steps else elapsed / args.seconds

    def done(elapsed: float) -> bool:
        return steps >= args.steps if args.steps else elapsed >= args.seconds

    while not done(elapsed := time.perf_counter() - start):
        records = demo.llm_text_records(args.batch, rng, args.rounds, args.text_first)
        ids, labels, mask = batchify([encode(r, tokenizer, args.format, demo.SHORT_ANSWER) for r in records])
        for group in optimizer.param_groups:  # 20 warm-up steps, cosine over the budget (seconds or steps)
            group["lr"] = args.lr * min(1.0, steps / 20) * 0.5 * (1 + math.cos(math.pi * progress(elapsed)))
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100  # the LM head on answer tokens only, as LlavaLlamaForCausalLM trains
        loss = F.cross_entropy(model.lm_head(hidden[keep]), target[keep])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        steps += 1

    model.eval()
    right: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for s in range(0, len(test), 100):
            ids, labels, mask = batchify(test[s : s + 100])
            pred = model(input_ids=ids, attention_mask=mask).logits[:, :-1].argmax(-1)
            for k in range(ids.shape[0]):
                name = category(held_out[s + k]["conversations"][0]["value"])
                right[name].append(first_turn_right(pred[k], labels[k, 1:], tokenizer.eos_token_id))
    accuracy = {name: round(sum(v) / len(v), 3) for name, v in sorted(right.items())}
    result = {
        "args": vars(args),
        "steps": steps,
        "train_seconds": round(elapsed, 1),
        "conversations_seen": steps * args.batch,
        "final_loss": round(loss.item(), 3),
        "accuracy": accuracy,
        "n": {name: len(v) for name, v in sorted(right.items())},
    }
    write("demo_text_probe", result)
    print(f"{steps} steps ({steps * args.batch} conversations) in {elapsed:.0f} s; held-out accuracy:")
    for name, acc in accuracy.items():
        print(f"  {name:<14}{acc:>7.3f}  (n={result['n'][name]})")


if __name__ == "__main__":
    main()
