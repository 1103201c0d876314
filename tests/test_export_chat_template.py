"""The exported chat template renders our prompts: apply_chat_template ids == ours, every template.

Tokenizer level (cheap, every template x tokenizer); test_export_hf.py runs the exported processor
with an image end to end.
"""

import pytest

from llava_train.constants import IMAGE_TOKEN_INDEX
from llava_train.data.conversation import TEMPLATES, render_prompt
from llava_train.data.preprocess import check_template_tokens, tokenizer_image_token
from llava_train.data.tokenizers import load_tokenizer
from llava_train.export.hf_native import native_chat_template, native_tokenizer

TURNS = [
    ("user", "What is in the picture?\n<image>"),
    ("assistant", "A cat."),
    ("user", "And its colour?"),
    ("assistant", "Black, with white paws."),
    ("user", "Thanks."),
]


def _messages(turns, system, parts):
    out = [] if system is None else [{"role": "system", "content": system}]
    for role, text in turns:
        if parts and "<image>" in text:  # llava-hf style content parts
            text_parts = [{"type": "text", "text": text.replace("<image>", "")}]
            out.append({"role": role, "content": [{"type": "image"}, *text_parts]})
        else:
            out.append({"role": role, "content": text})
    return out


@pytest.fixture(scope="module", params=["mistral", "mistral_legacy", "smollm2"])
def tokenizers(request):
    tok = load_tokenizer(request.param)
    if request.param == "smollm2":
        tok.add_special_tokens({"additional_special_tokens": list(TEMPLATES["llama_3"].required_tokens)})
    return tok, native_tokenizer(tok)


@pytest.mark.parametrize("template_name", sorted(TEMPLATES))
def test_chat_template_ids_equal_ours(tokenizers, template_name):
    tokenizer, (native, image_id) = tokenizers
    template = TEMPLATES[template_name]
    try:
        check_template_tokens(template, tokenizer)
    except ValueError:
        pytest.skip(f"{template_name} needs special tokens this tokenizer lacks")
    jinja = native_chat_template(template, tokenizer, native)
    cases = [(TURNS[:1], None), (TURNS, None), (TURNS, "Be brief."), ([("user", "Hi there.")], None)]
    if template_name == "plain":  # a caption prompt: the user turn is its image
        cases = [(TURNS[:1], None)]
    for turns, system in cases:
        want = tokenizer_image_token(
            render_prompt(template, turns, system=system, tokenizer=tokenizer), tokenizer
        )
        for parts in (False, True):
            text = native.apply_chat_template(
                _messages(turns, system, parts),
                chat_template=jinja,
                add_generation_prompt=True,
                tokenize=False,
            )
            # as the processor tokenizes it: BOS added unless the text starts with it (llama_3)
            bos = native.bos_token
            ids = native(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
            assert [IMAGE_TOKEN_INDEX if t == image_id else t for t in ids] == want, (turns, system, parts)
