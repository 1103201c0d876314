"""Tokenisation with labels from character spans, and IMAGE_TOKEN_INDEX placeholders.

The rendered conversation (conversation.render_segments) is cut at its ``<image>`` tags and every
chunk between tags is encoded as a fresh string, exactly as the original LLaVA's
``tokenizer_image_token``: on a SentencePiece tokenizer (Llama-2 / Mistral) the text after an image
therefore starts with "▁" ("<image>\\nQ" -> IMAGE, "▁", "<0x0A>", "Q"; a stage-1 caption "Six" is
"▁Six"), as the released checkpoints were trained. A token is supervised when the character it ends
on lies in a reply segment (the tokenizer's offset mapping), so ids never depend on where the label
boundaries fall. tests/test_data_templates.py compares ids and labels with the original's, run on the
same records and tokenizers (tests/fixtures/llava_golden.json).

Shapes: s = sequence length (text tokens + one IMAGE_TOKEN_INDEX per image).
"""

from __future__ import annotations

import bisect
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


def encode_chunk(text: str, tokenizer: Any) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and (start, end) character offsets of ``text`` encoded as a fresh string, no BOS / EOS."""
    if not text:
        return [], []
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; labels need its offset "
            "mapping: load it with AutoTokenizer.from_pretrained(path) (fast by default)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_with_images(text: str, tokenizer: Any) -> list[int]:
    """Ids of ``text`` with IMAGE_TOKEN_INDEX in place of each ``<image>``, each chunk encoded fresh."""
    ids: list[int] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += encode_chunk(chunk, tokenizer)[0]
    return ids


def tokenizer_image_token(
    prompt: str, tokenizer: Any, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors: str | None = None
) -> list[int] | torch.Tensor:
    """Ids of an inference prompt: one BOS (if the tokenizer uses one), IMAGE_TOKEN_INDEX per ``<image>``.

    The original LLaVA's function of that name, and the same ids as the prompt part of
    :func:`tokenize_conversation`.
    """
    bos = tokenizer.bos_token
    starts_with_bos = bool(bos) and prompt.startswith(bos)  # llama_3 renders <|begin_of_text|> itself
    ids = ([] if starts_with_bos else bos_ids(tokenizer)) + encode_with_images(prompt, tokenizer)
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
    bos_token: str | None = None,
    eos_token: str | None = None,
    strip_replies: bool = True,
) -> TokenizedConversation:
    """input_ids and labels of a whole conversation.

    Labels are IGNORE_INDEX everywhere except the assistant replies and their end-of-turn token
    (BOS, system, user turns, role tags and image placeholders are never supervised).
    ``bos_token`` / ``eos_token`` replace the tokenizer's strings in the rendered text: the original
    LLaVA writes "<s>" / "</s>" whatever the tokenizer, which ``eos_token="</s>"`` reproduces.
    ``strip_replies=False`` keeps the whitespace around replies, as the original does.
    """
    segments = render_segments(
        template,
        turns,
        system,
        bos_token=tokenizer.bos_token or "" if bos_token is None else bos_token,
        eos_token=tokenizer.eos_token or "" if eos_token is None else eos_token,
        mm_use_im_start_end=mm_use_im_start_end,
        strip_replies=strip_replies,
    )
    reply_spans, pos = [], 0  # [start, end) characters of each supervised segment
    for seg in segments:
        if seg.supervised:
            reply_spans.append((pos, pos + len(seg.text)))
        pos += len(seg.text)
    starts = [a for a, _ in reply_spans]

    def supervised(char: int) -> bool:
        k = bisect.bisect_right(starts, char) - 1
        return k >= 0 and char < reply_spans[k][1]

    ids = list(bos_ids(tokenizer)) if template.add_bos else []
    labels = [IGNORE_INDEX] * len(ids)
    token_ends: list[int] = []  # character (exclusive) each token ends on, for round_ends
    pos = 0
    for i, chunk in enumerate("".join(s.text for s in segments).split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            token_ends.append(pos)
            pos += len(DEFAULT_IMAGE_TOKEN)
        chunk_ids, offsets = encode_chunk(chunk, tokenizer)
        for tid, (a, b) in zip(chunk_ids, offsets):
            last = pos + (b - 1 if b > a else a)  # a zero-width piece ("▁") goes with the next character
            ids.append(tid)
            labels.append(tid if supervised(last) else IGNORE_INDEX)
            token_ends.append(pos + max(a, b))
        pos += len(chunk)
    n_bos = len(ids) - len(token_ends)
    round_ends = [n_bos + bisect.bisect_left(token_ends, end) + 1 for _, end in reply_spans]
    return TokenizedConversation(ids, labels, [min(r, len(ids)) for r in round_ends])
