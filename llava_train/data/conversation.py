"""Conversation templates: one frozen definition each, used for training labels and inference prompts.

A conversation renders to a list of :class:`Segment` s, each a piece of text and whether it is
supervised. Training tokenises the segments one by one (preprocess.py), so labels are built with the
ids; inference joins the same segments into one prompt string. Names follow the original LLaVA
(``plain``, ``vicuna_v1``/``v1``, ``llama_2``, ``mistral_instruct``, ``chatml``/``mpt``, ``llama_3``).

Placeholders ``{bos}`` / ``{eos}`` in a template are the tokenizer's BOS / EOS strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llava_train.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava_train.data.errors import BadRecordError

Turn = tuple[str, str]  # (role, text); role in {"user", "assistant"}

_ROLE_NAMES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Segment:
    """A run of rendered text; ``supervised`` runs are the assistant replies and their end token."""

    text: str
    supervised: bool = False


@dataclass(frozen=True)
class Template:
    """How one chat format lays out a conversation.

    Rendered order: prefix, system block (unless folded into the first user turn), then per round:
    turn_separator (not before the first), user_format, assistant_header, assistant_format (the only
    supervised part), assistant_suffix. A generation prompt stops after assistant_header.
    """

    name: str
    system: str = ""
    prefix: str = ""
    add_bos: bool = True  # prepend the tokenizer's BOS when the tokenizer adds one by default
    system_format: str = "{system}"
    system_in_first_user: str | None = None  # format folding the system into the first user text
    turn_separator: str = ""
    user_format: str = "{content}"
    assistant_header: str = ""
    assistant_format: str = "{content}{eos}"
    assistant_suffix: str = ""
    image_only_user: bool = False  # plain: the user turn is reduced to its image tags
    required_tokens: tuple[str, ...] = ()

    def stop_string(self, eos_token: str = "</s>") -> str:
        """Text that ends a generated reply (for generation stopping criteria)."""
        end = self.assistant_format.split("{content}", 1)[1]
        return end.replace("{eos}", eos_token) or eos_token


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("plain", image_only_user=True, assistant_format="{content}\n"),
        Template(
            "vicuna_v1",
            system=_VICUNA_SYSTEM,
            system_format="{system} ",
            user_format="USER: {content} ",
            assistant_header="ASSISTANT:",
            assistant_format=" {content}{eos}",
        ),
        Template(
            "llama_2",
            system=_LLAVA_SYSTEM,
            system_format="",
            system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
            turn_separator="{bos}",
            user_format="[INST] {content} [/INST]",
            assistant_format=" {content} {eos}",
        ),
        Template(
            "mistral_instruct",
            system_format="",
            system_in_first_user="{system}\n\n{content}",
            user_format="[INST] {content} [/INST]",
            assistant_format=" {content}{eos}",
        ),
        Template(
            "chatml",
            system="You are a helpful assistant.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user_format="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_header="<|im_start|>assistant\n",
            assistant_format="{content}<|im_end|>",
            assistant_suffix="\n",
            # As single tokens: generation stops on <|im_end|> only if it is one (eval.stop_token_ids).
            required_tokens=("<|im_start|>", "<|im_end|>"),
        ),
        Template(
            "llama_3",
            system=_LLAVA_SYSTEM,
            prefix="<|begin_of_text|>",
            add_bos=False,
            system_format="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            user_format="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
            assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
            assistant_format="{content}<|eot_id|>",
            required_tokens=_LLAMA3_TOKENS,
        ),
    )
}
_ALIASES = {
    "v1": "vicuna_v1",
    "vicuna": "vicuna_v1",
    "mpt": "chatml",
    "qwen": "chatml",
    "llava_llama_2": "llama_2",
}


def get_template(name: str) -> Template:
    """The template called ``name`` (original LLaVA names and aliases accepted)."""
    key = _ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise KeyError(
            f"unknown conversation template {name!r}; choose from {sorted(TEMPLATES) + sorted(_ALIASES)}"
        )
    return TEMPLATES[key]


def normalize_conversation(turns: Any, system: str | None = None) -> tuple[str | None, list[Turn]]:
    """Validate LLaVA ``conversations`` ([{from, value}]) into (system, [(role, text)]).

    A leading ``system`` turn overrides ``system``. Raises BadRecordError (bad_conversation,
    roles_out_of_order). The conversation may end on a user turn (a generation prompt).
    """
    if not isinstance(turns, list) or not turns:
        raise BadRecordError("bad_conversation", "`conversations` is empty or not a list")
    out: list[Turn] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecordError("bad_conversation", f"turn {i} is not a {{from, value: str}} dict")
        role = _ROLE_NAMES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise BadRecordError("bad_conversation", f"turn {i} has unknown role {turn.get('from')!r}")
        if role == "system":
            if i != 0:
                raise BadRecordError("roles_out_of_order", f"system turn at position {i}; it must come first")
            system = turn["value"]
            continue
        expected = "user" if len(out) % 2 == 0 else "assistant"
        if role != expected:
            raise BadRecordError("roles_out_of_order", f"turn {i} is {role}, expected {expected}")
        if role == "assistant" and not turn["value"].strip():
            raise BadRecordError("bad_conversation", f"turn {i}: empty assistant reply")
        out.append((role, turn["value"]))
    if not out:
        raise BadRecordError("bad_conversation", "no user/assistant turns")
    return system, out


def format_user_content(text: str, template: Template, mm_use_im_start_end: bool = False) -> str:
    """Move a turn's ``<image>`` tags to its start ("<image>\\n" + rest), as LLaVA does."""
    n_images = text.count(DEFAULT_IMAGE_TOKEN)
    if n_images:
        rest = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        text = DEFAULT_IMAGE_TOKEN * n_images if template.image_only_user else _image_lines(n_images, rest)
    elif template.image_only_user:
        text = ""
    if mm_use_im_start_end:
        text = text.replace(
            DEFAULT_IMAGE_TOKEN, DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        )
    return text


def _image_lines(n_images: int, rest: str) -> str:
    return ((DEFAULT_IMAGE_TOKEN + "\n") * n_images + rest).strip()


def render_segments(
    template: Template,
    turns: Sequence[Turn],
    system: str | None = None,
    *,
    add_generation_prompt: bool = False,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    mm_use_im_start_end: bool = False,
) -> list[Segment]:
    """Render (role, text) turns to segments; replies (plus end token) are the supervised ones."""
    system = template.system if system is None else system
    fill = {"bos": bos_token or "", "eos": eos_token or ""}
    segments = [Segment(template.prefix)] if template.prefix else []
    if system and template.system_in_first_user is None:
        segments.append(Segment(template.system_format.format(system=system, **fill)))
    for i, (role, text) in enumerate(turns):
        if role == "user":
            content = format_user_content(text, template, mm_use_im_start_end)
            if i == 0 and system and template.system_in_first_user is not None:
                content = template.system_in_first_user.format(system=system, content=content)
            sep = template.turn_separator.format(**fill) if i > 0 else ""
            head = (
                template.assistant_header.format(**fill)
                if i + 1 < len(turns) or add_generation_prompt
                else ""
            )
            segments.append(Segment(sep + template.user_format.format(content=content, **fill) + head))
        else:
            segments.append(Segment(template.assistant_format.format(content=text.strip(), **fill), True))
            if template.assistant_suffix:
                segments.append(Segment(template.assistant_suffix.format(**fill)))
    return _merge_unsupervised(segments)


def _merge_unsupervised(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring unsupervised segments (fewer tokenizer boundaries)."""
    merged: list[Segment] = []
    for seg in segments:
        if merged and not seg.supervised and not merged[-1].supervised:
            merged[-1] = Segment(merged[-1].text + seg.text)
        elif seg.text:
            merged.append(seg)
    return merged


def render_prompt(
    template: Template | str,
    conversation: Sequence[Turn] | list[dict],
    add_generation_prompt: bool = True,
    *,
    system: str | None = None,
    tokenizer: Any = None,
    mm_use_im_start_end: bool = False,
) -> str:
    """The prompt string for inference (or the full training text), without the tokenizer's BOS.

    ``conversation`` is a list of (role, text) pairs or LLaVA ``{from, value}`` dicts.
    """
    template = get_template(template) if isinstance(template, str) else template
    if conversation and isinstance(conversation[0], dict):
        system, conversation = normalize_conversation(list(conversation), system)
    bos, eos = _special_strings(tokenizer)
    segs = render_segments(
        template,
        conversation,
        system,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
        mm_use_im_start_end=mm_use_im_start_end,
    )
    return "".join(s.text for s in segs)


def _special_strings(tokenizer: Any) -> tuple[str, str]:
    if tokenizer is None:
        return "<s>", "</s>"
    return tokenizer.bos_token or "", tokenizer.eos_token or ""
