"""Tokenisation with labels built per segment, and IMAGE_TOKEN_INDEX placeholders.

Each rendered segment (conversation.render_segments) is tokenised on its own and the ids are
concatenated, so the label mask is exact by construction. A segment that does not start the text is
encoded as a *continuation*: SentencePiece tokenizers (Llama-2 / Mistral) otherwise prepend a space
("▁") to every piece. We encode "\\n" + text and drop the ids of "\\n" (a byte token that never merges
with its neighbours in SentencePiece); where the sentinel does merge (byte-level BPE, "\\n\\n"), plain
encoding is already a continuation and is used instead. Tests check, for every template and both real
tokenizers, that the ids decode to the rendered prompt and the labels to the replies.

Shapes: s = sequence length (text tokens + one IMAGE_TOKEN_INDEX per image).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llava_train.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava_train.data.conversation import Template, Turn, render_segments

_SENTINEL = "\n"
_BOS_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class TokenizedConversation:
    """input_ids [s] and labels [s] of one conversation; round_ends[k] = len(ids) after round k."""

    input_ids: list[int]
    labels: list[int]
    round_ends: list[int] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(1 for t in self.input_ids if t == IMAGE_TOKEN_INDEX)

    def truncated(self, num_rounds: int) -> TokenizedConversation:
        """Only the first ``num_rounds`` whole rounds (user turn + reply)."""
        end = self.round_ends[num_rounds - 1]
        return TokenizedConversation(self.input_ids[:end], self.labels[:end], self.round_ends[:num_rounds])


def bos_ids(tokenizer: Any) -> list[int]:
    """[bos_id] when the tokenizer adds a BOS by default (Llama-2, Mistral), else [] (SmolLM2, GPT-2)."""
    try:
        return _BOS_CACHE[tokenizer]
    except (KeyError, TypeError):
        pass
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    ids = [bos] if bos is not None and with_special[:1] == [bos] else []
    with contextlib.suppress(TypeError):
        _BOS_CACHE[tokenizer] = ids
    return ids


def encode_text(text: str, tokenizer: Any, *, continuation: bool) -> list[int]:
    """Ids of ``text`` without special tokens added; ``continuation``: it follows earlier text."""
    if not text:
        return []
    if not continuation:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    sentinel = tokenizer(_SENTINEL, add_special_tokens=False)["input_ids"]
    ids = tokenizer(_SENTINEL + text, add_special_tokens=False)["input_ids"]
    if ids[: len(sentinel)] == sentinel:
        return ids[len(sentinel) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_with_images(text: str, tokenizer: Any, *, continuation: bool) -> list[int]:
    """Ids of ``text`` with IMAGE_TOKEN_INDEX in place of each ``<image>``."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += encode_text(chunk, tokenizer, continuation=continuation or i > 0 or bool(ids))
    return ids


def tokenizer_image_token(
    prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors: str | None = None
) -> list[int] | torch.Tensor:
    """Ids of an inference prompt: one BOS (if the tokenizer uses one), IMAGE_TOKEN_INDEX per ``<image>``.

    Gives the same ids as the prompt part of :func:`tokenize_conversation`.
    """
    bos = tokenizer.bos_token
    starts_with_bos = bool(bos) and prompt.startswith(bos)  # llama_3 renders <|begin_of_text|> itself
    ids = ([] if starts_with_bos else bos_ids(tokenizer)) + encode_with_images(
        prompt, tokenizer, continuation=False
    )
    if image_token_index != IMAGE_TOKEN_INDEX:
        ids = [image_token_index if t == IMAGE_TOKEN_INDEX else t for t in ids]
    if return_tensors == "pt":
        return torch.tensor(ids, dtype=torch.long)
    if return_tensors is not None:
        raise ValueError(f"return_tensors={return_tensors!r}; only 'pt' or None")
    return ids


def check_template_tokens(template: Template, tokenizer: Any, mm_use_im_start_end: bool = False) -> None:
    """Fail loudly when the tokenizer lacks special tokens the template (or im_start/end) needs."""
    needed = list(template.required_tokens)
    if mm_use_im_start_end:
        needed += [DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN]
    vocab = tokenizer.get_vocab()
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise ValueError(
            f"template {template.name!r} needs special tokens {missing} that the tokenizer lacks; add them "
            "with tokenizer.add_special_tokens({'additional_special_tokens': [...]}) and resize the "
            "model's embeddings, or choose another template"
        )


def tokenize_conversation(
    turns: Sequence[Turn],
    template: Template,
    tokenizer: Any,
    system: str | None = None,
    *,
    mm_use_im_start_end: bool = False,
) -> TokenizedConversation:
    """input_ids and labels of a whole conversation, built segment by segment.

    Labels are IGNORE_INDEX everywhere except the assistant replies and their end-of-turn token
    (BOS, system, user turns, role tags and image placeholders are never supervised).
    """
    segments = render_segments(
        template,
        turns,
        system,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token or "",
        mm_use_im_start_end=mm_use_im_start_end,
    )
    ids = list(bos_ids(tokenizer)) if template.add_bos else []
    labels = [IGNORE_INDEX] * len(ids)
    round_ends: list[int] = []
    started = False
    for seg in segments:
        seg_ids = encode_with_images(seg.text, tokenizer, continuation=started)
        started = True
        ids += seg_ids
        labels += seg_ids if seg.supervised else [IGNORE_INDEX] * len(seg_ids)
        if seg.supervised:
            round_ends.append(len(ids))
    return TokenizedConversation(ids, labels, round_ends)
