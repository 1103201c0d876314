"""Pretrain a random decoder LLM on plain text, before LLaVA's stage 1.

LLaVA starts from a pretrained LLM (Vicuna, Mistral), which already knows what the instruction data
asks of it: to add, for one. Where none can be loaded (the offline demo builds its LLM from a config),
this step stands in for that pretraining with a list of (prompt, completion) texts, such as the demo's
worked sums ("3 + 5 + 8 =", " 16"). Only the decoder and lm_head train, on the next-token loss of the
completion's tokens and the end of sequence; the vision tower and the projector are untouched.

The softmax runs over the tokens the completions use (a dozen for sums: the digits, "▁" and "</s>"),
not the whole vocabulary: in a tiny LLM the [n, vocab] projection would be most of every step. The
other rows of lm_head keep their initial values; stage 2 trains the full vocabulary.

    texts = load_texts("data/demo/llm_texts.json")
    report = pretrain_llm(model, tokenizer, texts, LlmPretrainConfig())

``pretrain_saved_llm`` does the same to a saved checkpoint in another process (the demo trains the
tower meanwhile, on the other core) and writes the trained decoder weights to a safetensors file,
which ``load_decoder_weights`` puts back into the model.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llava_train.constants import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class LlmPretrainConfig:
    epochs: int = 1
    batch_size: int = 128
    lr: float = 5e-3
    warmup_ratio: float = 0.1  # then linear decay to 0
    max_grad_norm: float = 1.0
    max_steps: int | None = None  # stop early (a smoke run); None: every epoch
    seed: int = 0


def load_texts(path: str | Path) -> list[tuple[str, str]]:
    """The (prompt, completion) pairs of a JSON list of ``{"prompt": str, "completion": str}``."""
    records = json.loads(Path(path).read_text())
    texts = []
    for k, record in enumerate(records):
        if not isinstance(record, dict) or not record.get("prompt") or not record.get("completion"):
            raise ValueError(
                f"{path}: record {k} needs non-empty 'prompt' and 'completion' fields, got {record!r}"
            )
        texts.append((str(record["prompt"]), str(record["completion"])))
    if not texts:
        raise ValueError(f"{path} holds no texts")
    return texts


def encode(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of ``<bos> prompt completion </s>``: labels are the completion's tokens and the end
    of sequence, IGNORE_INDEX elsewhere. Fails if tokenizing the joined text splits the prompt
    differently from the prompt alone (the completion must start on a token boundary)."""
    head = tokenizer(prompt, add_special_tokens=False).input_ids
    full = tokenizer(prompt + completion, add_special_tokens=False).input_ids
    if full[: len(head)] != head or len(full) == len(head):
        raise ValueError(
            f"{prompt + completion!r}: the completion {completion!r} does not start on a token boundary of "
            "the prompt; start it with a space or end the prompt with one"
        )
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + full + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * (len(bos) + len(head)) + full[len(head) :] + [tokenizer.eos_token_id]
    return ids, labels


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (ids, attention mask, labels) of encoded rows."""
    length = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
    return ids, mask, labels


def decoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The decoder's and lm_head's parameters of a LLaVA causal LM: all but the vision tower's and the
    projector's (and image_newline's)."""
    skip = {id(p) for p in model.get_vision_tower().parameters()}
    skip |= {id(p) for p in model.get_model().mm_projector.parameters()}
    newline = getattr(model.get_model(), "image_newline", None)
    if newline is not None:
        skip.add(id(newline))
    return [p for p in model.parameters() if id(p) not in skip]


def _decoder_names(model: nn.Module) -> list[str]:
    """The names of :func:`decoder_parameters`: the keys of the file :func:`pretrain_saved_llm` writes."""
    keep = {id(p) for p in decoder_parameters(model)}
    return [name for name, p in model.named_parameters() if id(p) in keep]


def _completion_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, vocab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits over ``vocab`` at the supervised positions, the targets they predict, each one's row)."""
    hidden = model.get_model()(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = hidden[:, :-1][keep] @ model.lm_head.weight[vocab].T
    return logits, targets[keep], keep.nonzero()[:, 0]


@torch.no_grad()
def _accuracy(model: nn.Module, rows: list, pad_id: int, vocab: torch.Tensor) -> float:
    """Share of texts whose every completion token is the argmax over ``vocab`` (teacher forced)."""
    was_training = model.training
    model.eval()
    right = 0
    for start in range(0, len(rows), 512):
        ids, mask, labels = _batch(rows[start : start + 512], pad_id)
        logits, targets, row = _completion_logits(model, ids, mask, labels, vocab)
        wrong = row[vocab[logits.argmax(-1)] != targets].unique()  # rows with a wrong token
        right += len(ids) - len(wrong)
    model.train(was_training)
    return right / max(1, len(rows))


def pretrain_llm(
    model: nn.Module, tokenizer: Any, texts: list[tuple[str, str]], cfg: LlmPretrainConfig
) -> dict:
    """Train the decoder and lm_head of ``model`` (a LLaVA causal LM) in place on ``texts``; returns a report.

    ``cfg.epochs`` passes over the texts in a new random order each, batches of ``cfg.batch_size``. The
    report has the loss every tenth of the run and the share of (up to 2,000 of) the texts completed
    right afterwards: every completion token the argmax, teacher forced.
    """
    rows = [encode(tokenizer, prompt, completion) for prompt, completion in texts]
    vocab = torch.tensor(sorted({t for _, labels in rows for t in labels if t != IGNORE_INDEX}))
    to_vocab = torch.full((int(vocab.max()) + 1,), IGNORE_INDEX, dtype=torch.long)
    to_vocab[vocab] = torch.arange(len(vocab))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(cfg.seed)
    steps = cfg.epochs * math.ceil(len(rows) / cfg.batch_size)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)

    torch.manual_seed(cfg.seed)
    params = decoder_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, int(steps * cfg.warmup_ratio))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)),
    )
    model.train()
    losses, start, every, step = [], time.perf_counter(), max(1, math.ceil(steps / 10)), 0
    for _ in range(cfg.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for first in range(0, len(order), cfg.batch_size):
            if step == steps:
                break
            ids, mask, labels = _batch([rows[i] for i in order[first : first + cfg.batch_size]], pad_id)
            logits, targets, _ = _completion_logits(model, ids, mask, labels, vocab)
            loss = F.cross_entropy(logits, to_vocab[targets])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            step += 1
            if step % every == 0 or step == steps:
                losses.append(round(loss.item(), 4))
                log.info("LLM pretraining step %d/%d: loss %.4f", step, steps, losses[-1])
    report = {
        "steps": steps,
        "loss": losses,
        "vocab": len(vocab),
        "accuracy": _accuracy(model, rows[:2000], pad_id, vocab),
        "n_texts": len(rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info(
        "LLM pretraining: %d texts, accuracy %.4f, %.0f s", len(rows), report["accuracy"], report["seconds"]
    )
    return report


def pretrain_saved_llm(
    model_dir: str | Path, texts_path: str | Path, out_file: str | Path, cfg: LlmPretrainConfig
) -> dict:
    """:func:`pretrain_llm` on the checkpoint and tokenizer saved in ``model_dir``; the trained decoder and
    lm_head weights go to ``out_file`` (safetensors). Returns the report. Runs in its own process."""
    from safetensors.torch import save_file

    from llava_train.data import load_tokenizer
    from llava_train.export import load_original

    model = load_original(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    report = pretrain_llm(model, tokenizer, load_texts(texts_path), cfg)
    params = dict(model.named_parameters())
    state = {name: params[name].detach().contiguous() for name in _decoder_names(model)}
    save_file(state, str(out_file))
    return report


def load_decoder_weights(model: nn.Module, path: str | Path) -> None:
    """Put the decoder weights :func:`pretrain_saved_llm` wrote back into ``model``; every decoder parameter
    must be in the file and nothing else."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    names = set(_decoder_names(model))
    if set(state) != names:
        raise ValueError(
            f"{path} does not hold this model's decoder: missing {sorted(names - set(state))[:5]}, "
            f"unexpected {sorted(set(state) - names)[:5]}"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in state.items():
            params[name].copy_(tensor)
