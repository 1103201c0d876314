"""A conversation template as a Jinja chat template (transformers' ``apply_chat_template``), for exports.

The Jinja renders exactly conversation.render_prompt's text for the same messages, so a
transformers-native export (export/hf_native.py) builds the prompts the model was trained on.
"""

from __future__ import annotations

import json
import string

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data.conversation import Template


def _jinja_expr(fmt: str, **names: str) -> str:
    """A Jinja expression of a ``str.format`` template: literals quoted, ``{field}`` -> names[field]."""
    parts = []
    for literal, field_name, _, _ in string.Formatter().parse(fmt):
        if literal:
            parts.append(json.dumps(literal))
        if field_name is not None:
            parts.append(names[field_name])
    return " + ".join(parts) if parts else '""'


def chat_template_jinja(template: Template, image_separator: str = "") -> str:
    """A Jinja chat template rendering exactly :func:`render_prompt`'s text, without BOS.

    As llava-hf's templates: the processor adds BOS when it tokenizes the text (``tokenizer.
    apply_chat_template(tokenize=True)`` adds none, so it needs ``tokenizer(text)`` to get ours).

    Messages are ``{role, content}`` with content a string (``<image>`` tags inline) or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts, as llava-hf processors take;
    a leading system message replaces the template's system. ``image_separator`` is written between
    each ``<image>`` and the newline after it: on a tokenizer where text after a special token loses
    SentencePiece's "▁", a " " restores the ids of a fresh chunk (what training saw). (plain: the
    prompt ends at the image, nothing to restore.)
    """
    t = template
    names = {"bos": "bos_token", "eos": "eos_token", "system": "ns.system", "content": "c"}
    if t.image_only_user:
        user_text = "('<image>' * n)"
    else:
        user_text = "(('<image>\\n') * n + rest) | trim"
    lines = [
        "{%- set ns = namespace(system=" + json.dumps(t.system) + ") -%}",
        "{%- set msgs = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set s = messages[0]['content'] -%}",
        "{%- if s is not string -%}{%- set s = s | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join('') -%}{%- endif -%}",
        "{%- set ns.system = s -%}{%- set msgs = messages[1:] -%}",
        "{%- endif -%}",
        "{{- " + json.dumps(t.prefix) + " -}}" if t.prefix else "",
    ]
    if t.system_in_first_user is None:
        cond = "true" if t.empty_system_block else "ns.system"
        lines.append(
            "{%- if " + cond + " -%}{{- " + _jinja_expr(t.system_format, **names) + " -}}{%- endif -%}"
        )
    lines += [
        "{%- for m in msgs -%}",
        "{%- if m['content'] is string -%}",
        "{%- set n = m['content'].count('<image>') -%}{%- set text = m['content'] -%}",
        "{%- else -%}",
        "{%- set n = m['content'] | selectattr('type', 'equalto', 'image') | list | length -%}",
        "{%- set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
        "| join('') -%}",
        "{%- endif -%}",
        "{%- if m['role'] == 'user' -%}",
        "{%- set rest = text.replace('<image>', '') | trim -%}",
        "{%- if n > 0 -%}{%- set c = "
        + user_text
        + " -%}"
        + ("{%- else -%}{%- set c = '' -%}" if t.image_only_user else "{%- else -%}{%- set c = text -%}")
        + "{%- endif -%}",
    ]
    if t.system_in_first_user is not None:
        folded = _jinja_expr(t.system_in_first_user, **names)
        lines.append("{%- if loop.first and ns.system -%}{%- set c = " + folded + " -%}{%- endif -%}")
    if image_separator:
        sep = json.dumps(DEFAULT_IMAGE_TOKEN + image_separator + "\n")
        lines.append("{%- set c = c.replace('<image>\\n', " + sep + ") -%}")
    lines += [
        "{%- if not loop.first -%}{{- " + _jinja_expr(t.turn_separator, **names) + " -}}{%- endif -%}",
        "{{- " + _jinja_expr(t.user_format, **names) + " -}}",
        "{%- if not loop.last or add_generation_prompt -%}{{- "
        + _jinja_expr(t.assistant_header, **names)
        + " -}}{%- endif -%}",
        "{%- else -%}",
        "{%- set c = text | trim -%}",
        "{{- " + _jinja_expr(t.assistant_format + t.assistant_suffix, **names) + " -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if t.suffix:
        lines.append(
            "{%- if msgs and msgs[-1]['role'] == 'assistant' -%}{{- "
            + json.dumps(t.suffix)
            + " -}}{%- endif -%}"
        )
    return "".join(line for line in lines if line)
