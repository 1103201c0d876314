"""Batched greedy answer generation for evaluation, and sharding over torchrun processes.

The prompt of a question is rendered with the same conversation template as training
(``llava_train.data.render_prompt``), tokenised with ``tokenizer_image_token`` (IMAGE_TOKEN_INDEX per
image), and its image goes through the data package's ``process_images`` (pad / square / anyres, as
the model config says). Batches are LEFT padded so every row's last prompt token sits at the end;
the model's multimodal merge re-pads after inserting the image features on the side named by
``config.tokenizer_padding_side``, which we therefore set to "left" for the duration of the call.

Shapes: b batch, s prompt length, n_img images of the batch (rows without an image have none).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data import get_template, load_image, process_images, render_prompt, tokenizer_image_token
from llava_train.data.conversation import Template
from llava_train.data.image import mean_colour
from llava_train.data.preprocess import check_template_tokens
from llava_train.eval.questions import Question, make_answer_record, read_jsonl, write_jsonl


def build_prompt(
    question: Question, template: Template, tokenizer: Any, mm_use_im_start_end: bool = False
) -> str:
    """Generation prompt of one question: its image tag first (as LLaVA's model_vqa), then the text."""
    text = question.text
    if question.image is not None and DEFAULT_IMAGE_TOKEN not in text:
        text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
    return render_prompt(
        template,
        [("user", text)],
        add_generation_prompt=True,
        tokenizer=tokenizer,
        mm_use_im_start_end=mm_use_im_start_end,
    )


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids [b, s] and attention mask [b, s] (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, s]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [b, s]
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids, mask


@contextlib.contextmanager
def padding_side(model: Any, side: str) -> Iterator[None]:
    """Temporarily set ``model.config.tokenizer_padding_side`` (read by the multimodal merge)."""
    old = getattr(model.config, "tokenizer_padding_side", "right")
    model.config.tokenizer_padding_side = side
    try:
        yield
    finally:
        model.config.tokenizer_padding_side = old


def stop_token_ids(tokenizer: Any, template: Template) -> list[int]:
    """Ids that end a reply: the tokenizer's EOS and the template's end-of-turn token if it is one token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stop = template.stop_string(tokenizer.eos_token or "").strip()
    stop_ids = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
    if len(stop_ids) == 1 and stop_ids[0] not in ids:
        ids.append(stop_ids[0])
    if not ids:
        raise ValueError(
            "the tokenizer has no EOS token and the template no single-token stop; set tokenizer.eos_token"
        )
    return ids


def decode_reply(new_ids: torch.Tensor, tokenizer: Any, stop_ids: Sequence[int]) -> str:
    """Text of one generated row, cut at its first stop token, special tokens dropped."""
    ids = new_ids.tolist()
    for i, tok in enumerate(ids):
        if tok in stop_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _batch_images(
    batch: Sequence[Question], model: Any, image_processor: Any, image_folder: str | Path | None
) -> dict:
    """``images`` / ``image_sizes`` generate kwargs of the rows that have an image (none: empty dict)."""
    paths = [q.image for q in batch if q.image is not None]
    folder = Path(image_folder) if image_folder is not None else Path()
    background = mean_colour(image_processor)  # transparency filled as in training (LazySupervisedDataset)
    return image_inputs(
        [load_image(folder / p, background=background) for p in paths], model, image_processor
    )


def image_inputs(images: Sequence[Any], model: Any, image_processor: Any) -> dict:
    """``images`` / ``image_sizes`` generate kwargs of loaded RGB PIL images in row order (none: {})."""
    if not images:
        return {}
    pixels, sizes = process_images(
        list(images),
        image_processor,
        model.config.image_aspect_ratio,
        getattr(model.config, "image_grid_pinpoints", None),
    )
    tower = model.get_vision_tower()
    to = {"device": tower.device, "dtype": tower.dtype}
    pixels = [p.to(**to) for p in pixels] if isinstance(pixels, list) else pixels.to(**to)  # [n_img, 3, S, S]
    return {"images": pixels, "image_sizes": sizes}


@torch.no_grad()
def generate_batch(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    batch: Sequence[Question],
    template: Template,
    max_new_tokens: int,
    image_folder: str | Path | None = None,
    generate_kwargs: dict | None = None,
) -> tuple[list[str], list[str]]:
    """Greedy answers (and prompts) of one batch of questions, with left padding and the KV cache.

    ``generate_kwargs`` go to ``model.generate`` too (e.g. ``synced_gpus`` under ZeRO-3)."""
    mm_start_end = bool(getattr(model.config, "mm_use_im_start_end", False))
    prompts = [build_prompt(q, template, tokenizer, mm_start_end) for q in batch]
    stops = stop_token_ids(tokenizer, template)
    new = generate_tokens(
        model,
        tokenizer,
        prompts,
        _batch_images(batch, model, image_processor, image_folder),
        stops,
        max_new_tokens,
        **(generate_kwargs or {}),
    )
    return [decode_reply(row, tokenizer, stops) for row in new], prompts


@torch.no_grad()
def generate_tokens(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    images: dict,
    stops: Sequence[int],
    max_new_tokens: int,
    **generate_kwargs: Any,
) -> torch.Tensor:
    """New token ids [b, <= max_new_tokens] of left-padded ``prompts`` (greedy unless told otherwise).

    ``images`` are ``image_inputs``' kwargs; ``generate_kwargs`` go to ``model.generate`` (a streamer,
    stopping criteria, ``do_sample`` / ``temperature`` / ``top_p`` for sampling).
    """
    ids, mask = left_pad([tokenizer_image_token(p, tokenizer) for p in prompts], tokenizer.pad_token_id)
    device = model.get_model().embed_tokens.weight.device
    settings = {"do_sample": False, "num_beams": 1, **generate_kwargs}
    with padding_side(model, "left"):
        new = model.generate(
            ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            use_cache=True,
            eos_token_id=list(stops),
            pad_token_id=tokenizer.pad_token_id,
            **settings,
            **images,
        )  # [b, <= max_new_tokens], new tokens only
    if new.shape[1] > max_new_tokens:  # the model API returns new tokens only (docs/INTERFACES.md)
        raise RuntimeError(
            f"generate returned {new.shape[1]} > max_new_tokens={max_new_tokens} tokens per row"
        )
    return new


def generate_answers(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    questions: Sequence[Question],
    template: str | Template,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    image_folder: str | Path | None = None,
    model_id: str = "llava",
    generate_kwargs: dict | None = None,
) -> list[dict]:
    """Answer records (LLaVA answers-jsonl format) for ``questions``, in their order.

    Questions are sorted by prompt length inside the call so batches waste little padding; the
    result is put back in question order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; use llava_train.data.load_tokenizer, which sets one"
        )
    template = get_template(template) if isinstance(template, str) else template
    check_template_tokens(template, tokenizer, bool(getattr(model.config, "mm_use_im_start_end", False)))
    model.eval()
    order = sorted(range(len(questions)), key=lambda i: len(questions[i].text))
    records: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [questions[i] for i in idx]
        texts, prompts = generate_batch(
            model, tokenizer, image_processor, batch, template, max_new_tokens, image_folder, generate_kwargs
        )
        for i, q, prompt, text in zip(idx, batch, prompts, texts):
            records[i] = make_answer_record(q, prompt, text, model_id, {"template": template.name})
    return [records[i] for i in range(len(questions))]


# ----------------------------------------------------------------------------------------------
# Sharding over processes (torchrun): rank r answers questions[r::world]; rank 0 merges.
# ----------------------------------------------------------------------------------------------


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_questions(questions: Sequence[Question], rank: int, world_size: int) -> list[Question]:
    """This rank's share: every ``world_size``-th question starting at ``rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return list(questions[rank::world_size])


def shard_path(answers_file: str | Path, rank: int) -> Path:
    """Where rank ``rank`` writes its answers before the merge."""
    path = Path(answers_file)
    return path.with_name(f"{path.name}.rank{rank}")


def merge_answer_shards(
    answers_file: str | Path, questions: Sequence[Question], world_size: int
) -> list[dict]:
    """Merge the rank files into ``answers_file`` in question order, then delete them."""
    by_id: dict[str, dict] = {}
    for rank in range(world_size):
        for rec in read_jsonl(shard_path(answers_file, rank)):
            by_id[str(rec["question_id"])] = rec
    missing = [q.question_id for q in questions if str(q.question_id) not in by_id]
    if missing:
        raise RuntimeError(
            f"answer shards lack {len(missing)} questions (e.g. {missing[:5]}); a rank failed?"
        )
    merged = [by_id[str(q.question_id)] for q in questions]
    write_jsonl(merged, answers_file)
    for rank in range(world_size):
        shard_path(answers_file, rank).unlink()
    return merged


def generate_answers_sharded(
    model: Any,
    tokenizer: Any,
    image_processor: Any,
    questions: Sequence[Question],
    answers_file: str | Path,
    **kwargs: Any,
) -> list[dict] | None:
    """``generate_answers`` on this rank's shard; rank 0 writes and returns the merged answers, others None.

    Single process: plain generation and write. Under torchrun, torch.distributed must be initialised
    (for the barrier) before the call.
    """
    rank, world = dist_rank_world()
    if world == 1:
        records = generate_answers(model, tokenizer, image_processor, questions, **kwargs)
        write_jsonl(records, answers_file)
        return records
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={world} but torch.distributed is not initialised; call init_process_group first"
        )
    part = shard_questions(questions, rank, world)
    write_jsonl(
        generate_answers(model, tokenizer, image_processor, part, **kwargs), shard_path(answers_file, rank)
    )
    torch.distributed.barrier()
    merged = merge_answer_shards(answers_file, questions, world) if rank == 0 else None
    torch.distributed.barrier()
    return merged
