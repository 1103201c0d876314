"""Batched greedy answer generation for evaluation, and sharding over torchrun processes.

The prompt of a question is rendered with the same conversation template as training
(``llava_train.data.render_prompt``), tokenised with ``tokenizer_image_token`` (IMAGE_TOKEN_INDEX per
image), and its image goes through the data package's ``process_images`` (pad / square / anyres, as
the model config says). Batches are LEFT padded so every row's last prompt token sits at the end;
the model's multimodal merge re-pads after inserting the image features on the side named by
``config.tokenizer_padding_side``, which we therefore set to "left" for the duration of the call.

Image paths go through training's root check (``resolve_image_path``): an absolute path or one that
leaves ``image_folder`` is refused. A bad question (that, or a missing / unreadable image) raises
``BadQuestionError`` naming its ``question_id``; with ``bad_record_policy="skip"`` it gets an empty
answer whose ``metadata.skipped`` says why (counted by run_eval, scored as wrong).

Answers are appended to a progress file (``<answers_file>.rank<R>``) batch by batch, as LLaVA's
model_vqa appends its answers: a run that stops (a bad question, a kill) keeps every answer so far, and
the next run with the same files answers only the rest.

Shapes: b batch, s prompt length, n_img images of the batch (rows without an image have none).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data import get_template, load_image, process_images, render_prompt, tokenizer_image_token
from llava_train.data.conversation import Template
from llava_train.data.dataset import resolve_image_path
from llava_train.data.errors import BadRecordError
from llava_train.data.image import mean_colour
from llava_train.data.preprocess import check_template_tokens
from llava_train.eval.questions import Question, make_answer_record, read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


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


class BadQuestionError(ValueError):
    """A question that cannot be answered (bad image path, missing / unreadable image), by question_id."""

    def __init__(self, question_id: int | str, reason: Exception):
        self.question_id = question_id
        super().__init__(f"question_id {question_id!r}: {reason}")


def load_question_image(question: Question, image_folder: str | Path | None, image_processor: Any) -> Any:
    """The question's image (RGB PIL) from under ``image_folder``; BadQuestionError naming the question."""
    try:
        # training's root check: no absolute path, no `..` or symlink out of the image folder
        path = resolve_image_path(question.image, str(image_folder) if image_folder is not None else "")
        return load_image(path, background=mean_colour(image_processor))  # transparency as in training
    except BadRecordError as err:
        raise BadQuestionError(question.question_id, err) from None


def _batch_images(
    batch: Sequence[Question],
    model: Any,
    image_processor: Any,
    image_folder: str | Path | None,
    loaded: Sequence[Any] | None = None,
) -> dict:
    """``images`` / ``image_sizes`` generate kwargs of the rows that have an image (none: empty dict).
    ``loaded``: the images of those rows, already loaded."""
    with_image = [q for q in batch if q.image is not None]
    if not with_image:
        return {}
    pil = loaded or [load_question_image(q, image_folder, image_processor) for q in with_image]
    return image_inputs(pil, model, image_processor)


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
    images: Sequence[Any] | None = None,
) -> tuple[list[str], list[str]]:
    """Greedy answers (and prompts) of one batch of questions, with left padding and the KV cache.

    ``generate_kwargs`` go to ``model.generate`` too (e.g. ``synced_gpus`` under ZeRO-3); ``images``: the
    batch's images (rows with one, in order), when already loaded."""
    mm_start_end = bool(getattr(model.config, "mm_use_im_start_end", False))
    prompts = [build_prompt(q, template, tokenizer, mm_start_end) for q in batch]
    stops = stop_token_ids(tokenizer, template)
    new = generate_tokens(
        model,
        tokenizer,
        prompts,
        _batch_images(batch, model, image_processor, image_folder, images),
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
    bad_record_policy: str = "strict",
    progress_file: str | Path | None = None,
) -> list[dict]:
    """Answer records (LLaVA answers-jsonl format) for ``questions``, in their order.

    Questions are sorted by prompt length inside the call so batches waste little padding; the
    result is put back in question order. ``progress_file``: answers found there are kept (not asked
    again) and each new batch's answers are appended to it as they come. ``bad_record_policy``:
    "strict" raises BadQuestionError at a bad question, "skip" gives it an empty answer with
    ``metadata.skipped``.
    """
    if bad_record_policy not in ("strict", "skip"):
        raise ValueError(f"bad_record_policy={bad_record_policy!r}: use strict or skip")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            "the tokenizer has no pad token; use llava_train.data.load_tokenizer, which sets one"
        )
    template = get_template(template) if isinstance(template, str) else template
    check_template_tokens(template, tokenizer, bool(getattr(model.config, "mm_use_im_start_end", False)))
    model.eval()
    done = read_progress(progress_file) if progress_file else {}
    records = {i: done[str(q.question_id)] for i, q in enumerate(questions) if str(q.question_id) in done}
    order = sorted(
        (i for i in range(len(questions)) if i not in records), key=lambda i: len(questions[i].text)
    )
    meta = {"template": template.name}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        good, images, new = [], [], {}
        for i in idx:
            q = questions[i]
            try:
                if q.image is not None:
                    images.append(load_question_image(q, image_folder, image_processor))
                good.append(i)
            except BadQuestionError as err:
                if bad_record_policy == "strict":
                    raise
                logger.warning("skipping bad question: %s", err)
                new[i] = make_answer_record(q, "", "", model_id, {**meta, "skipped": str(err)})
        if good:
            batch = [questions[i] for i in good]
            texts, prompts = generate_batch(
                model, tokenizer, image_processor, batch, template, max_new_tokens, image_folder,
                generate_kwargs=generate_kwargs, images=images,
            )  # fmt: skip
            for i, q, prompt, text in zip(good, batch, prompts, texts):
                new[i] = make_answer_record(q, prompt, text, model_id, meta)
        if progress_file:
            append_jsonl([new[i] for i in idx], progress_file)
        records.update(new)
    return [records[i] for i in range(len(questions))]


def read_progress(path: str | Path) -> dict[str, dict]:
    """{str(question_id): answer} of a progress file (missing: {}). A torn last line (a kill mid-write)
    is cut off the file, so that the next append starts on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    good_end = data.rfind(b"\n") + 1
    if good_end < len(data):
        logger.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - good_end)
        with open(path, "r+b") as f:
            f.truncate(good_end)
    found = {}
    for line_no, line in enumerate(data[:good_end].decode("utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{line_no}: not valid JSON ({err}); delete the file to start over"
                ) from err
            found[str(rec["question_id"])] = rec
    if found:
        logger.info("%s: %d answers from an earlier run kept", path, len(found))
    return found


def append_jsonl(records: Sequence[dict], path: str | Path) -> None:
    """Append records to a jsonl file and flush them to the OS (they survive the process)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


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
    progress = shard_path(answers_file, rank)  # appended as answers come; resumed from when present
    if world == 1:
        records = generate_answers(
            model, tokenizer, image_processor, questions, progress_file=progress, **kwargs
        )
        write_jsonl(records, answers_file)
        progress.unlink()
        return records
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            f"WORLD_SIZE={world} but torch.distributed is not initialised; call init_process_group first"
        )
    part = shard_questions(questions, rank, world)
    generate_answers(model, tokenizer, image_processor, part, progress_file=progress, **kwargs)
    torch.distributed.barrier()
    merged = merge_answer_shards(answers_file, questions, world) if rank == 0 else None
    torch.distributed.barrier()
    return merged
