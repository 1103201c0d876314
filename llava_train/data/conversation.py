"""Conversation templates: one frozen definition each, used for training labels and inference prompts.

A conversation renders to a list of :class:`Segment` s, each a piece of text and whether it is
supervised; preprocess.py tokenises the joined text as the original LLaVA does and labels the tokens
that fall in supervised segments; inference uses the same text up to the assistant header.

The original LLaVA's templates (llava/conversation.py), with the same names, text and ids
(tests/test_data_templates.py compares with its preprocess_* output): ``plain`` (``v0_plain``),
``v0`` (``default``, ``llava_v0``), ``vicuna_v1`` (``v1``, ``vicuna``), ``llava_v1``, ``llama_2``,
``llava_llama_2``, ``mistral_instruct``, ``mpt``, ``chatml_direct`` (``mistral_direct``). Ours
besides: ``mistral_native`` (Mistral-Instruct's own format), ``chatml`` (``qwen``: newline after
each ``<|im_end|>``; LLaVA-NeXT's ``qwen_1_5`` / ``qwen_2``), ``gemma_instruct`` (LLaVA-NeXT's), ``llama_3``.
LLaVA-NeXT's qwen_1_5 training also supervises every ``<|im_start|>``, ``<|im_end|>`` and newline token,
user turns included; ours supervises the replies and their ``<|im_end|>`` only. Deliberate differences
(docs/FIDELITY.md has them all):

- whitespace around a reply is stripped (``strip_replies=False`` keeps it, as the original);
- ``{bos}`` / ``{eos}`` are the tokenizer's BOS / EOS strings, where the original writes "<s>" /
  "</s>" whatever the tokenizer (preprocess.tokenize_conversation(eos_token="</s>") reproduces it);
- several ``<image>`` tags in one turn stay one per image, each followed by "\\n", all at the turn's
  start (the original keeps one tag per turn); ``plain`` accepts more than one round;
- ``v0``: labels are the replies (the original's v0 mask drifts one token per sentence), and the
  inference prompt uses the training layout (the original's ``get_prompt`` for v0 joins turns with
  "###" and adds two example turns);
- ``mpt`` / ``chatml_direct``: replies and their ``<|im_end|>`` are supervised (the original's round
  arithmetic leaves out each ``<|im_end|>`` and drops every record on these tokenizers).
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
    supervised part), assistant_suffix; after the last reply, ``suffix``. A generation prompt stops
    after assistant_header.
    """

    name: str
    system: str = ""
    prefix: str = ""
    add_bos: bool = True  # prepend the tokenizer's BOS when the tokenizer adds one by default
    system_format: str = "{system}"
    empty_system_block: bool = False  # render system_format even for an empty system (as the original)
    system_in_first_user: str | None = None  # format folding the system into the first user text
    turn_separator: str = ""
    user_format: str = "{content}"
    assistant_header: str = ""
    assistant_format: str = "{content}{eos}"
    assistant_suffix: str = ""
    suffix: str = ""  # after the last reply (training text only)
    stop: str = ""  # the text that ends a reply when it is not the end of assistant_format
    image_only_user: bool = False  # plain: the user turn is reduced to its image tags
    required_tokens: tuple[str, ...] = ()

    def stop_string(self, eos_token: str = "</s>") -> str:
        """Text that ends a generated reply (for generation stopping criteria)."""
        if self.stop:
            return self.stop
        end = self.assistant_format.split("{content}", 1)[1]
        return end.replace("{eos}", eos_token).strip() or eos_token


_HUMAN_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_USER_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_LLAVA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language."
)
_LLAMA2_SYSTEM = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while "
    "being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and "
    "positive in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain "
    "why instead of answering something not correct. If you don't know the answer to a question, "
    "please don't share false information."
)
_MPT_SYSTEM = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest "
    "answers."
)
_LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
_GEMMA_TOKENS = ("<start_of_turn>", "<end_of_turn>")


def _vicuna(name: str, system: str) -> Template:
    """LLaVA-1.5's ``v1`` layout: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."."""
    return Template(
        name,
        system=system,
        system_format="{system} ",
        empty_system_block=True,
        user_format="USER: {content} ",
        assistant_header="ASSISTANT:",
        assistant_format=" {content}{eos}",
    )


def _llama2(name: str, system: str, turn_separator: str) -> Template:
    """The original's LLAMA_2 style: "[INST] <<SYS>>..<</SYS>>\n\nq [/INST] a </s>"; ``system`` may be ""."""
    return Template(
        name,
        system=system,
        system_format="",
        system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        turn_separator=turn_separator,
        user_format="[INST] {content} [/INST]",
        assistant_format=" {content} {eos}",
    )


def _mpt(name: str, system: str) -> Template:
    """The original's MPT style: ChatML with no newline after ``<|im_end|>``."""
    return Template(
        name,
        system=system,
        system_format="<|im_start|>system\n{system}<|im_end|>",
        empty_system_block=True,
        user_format="<|im_start|>user\n{content}<|im_end|>",
        assistant_header="<|im_start|>assistant\n",
        assistant_format="{content}<|im_end|>",
        # As single tokens: generation stops on <|im_end|> only if it is one (eval.stop_token_ids).
        required_tokens=_CHATML_TOKENS,
    )


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template("plain", image_only_user=True, assistant_format="{content}\n"),
        Template(
            "v0",
            system=_HUMAN_SYSTEM,
            system_format="{system}\n\n",
            empty_system_block=True,
            user_format="### Human: {content}\n",
            assistant_header="### Assistant:",
            assistant_format=" {content}\n",
            suffix="### ",
            stop="###",
        ),
        _vicuna("vicuna_v1", _USER_SYSTEM),
        _vicuna("llava_v1", _HUMAN_SYSTEM),
        _llama2("llama_2", _LLAMA2_SYSTEM, "{bos}"),
        _llama2("llava_llama_2", _LLAVA_SYSTEM, "{bos}"),
        _llama2("mistral_instruct", "", ""),
        Template(  # Mistral-7B-Instruct's own format (not the original LLaVA's mistral_instruct)
            "mistral_native",
            system_format="",
            system_in_first_user="{system}\n\n{content}",
            user_format="[INST] {content} [/INST]",
            assistant_format=" {content}{eos}",
        ),
        _mpt("mpt", _MPT_SYSTEM),
        _mpt("chatml_direct", "Answer the questions."),
        Template(  # Qwen / SmolLM2 ChatML: a newline after every <|im_end|>
            "chatml",
            system="You are a helpful assistant.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            user_format="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_header="<|im_start|>assistant\n",
            assistant_format="{content}<|im_end|>",
            assistant_suffix="\n",
            required_tokens=_CHATML_TOKENS,
        ),
        Template(  # LLaVA-NeXT's gemma_instruct: no system turn (a given one is folded into the first user turn)
            "gemma_instruct",
            system_format="",
            system_in_first_user="{system}\n\n{content}",
            user_format="<start_of_turn>user\n{content}<end_of_turn>\n",
            assistant_header="<start_of_turn>model\n",
            assistant_format="{content}<end_of_turn>\n",
            required_tokens=_GEMMA_TOKENS,
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
    "default": "v0",
    "llava_v0": "v0",
    "v0_plain": "plain",
    "v1": "vicuna_v1",
    "vicuna": "vicuna_v1",
    "mistral_direct": "chatml_direct",
    "qwen": "chatml",
    "qwen_1_5": "chatml",  # LLaVA-NeXT's (OneVision's) names for the same ChatML turns
    "qwen_2": "chatml",
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
    strip_replies: bool = True,
) -> list[Segment]:
    """Render (role, text) turns to segments; replies (plus end token) are the supervised ones.

    ``strip_replies``: whitespace around a reply is dropped (the original LLaVA keeps it; False does).
    """
    system = template.system if system is None else system
    fill = {"bos": bos_token or "", "eos": eos_token or ""}
    segments = [Segment(template.prefix)] if template.prefix else []
    if (system or template.empty_system_block) and template.system_in_first_user is None:
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
            segments.append(
                Segment(
                    template.assistant_format.format(content=text.strip() if strip_replies else text, **fill),
                    True,
                )
            )
            if template.assistant_suffix:
                segments.append(Segment(template.assistant_suffix.format(**fill)))
    if template.suffix and turns and turns[-1][0] == "assistant":
        segments.append(Segment(template.suffix))
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
