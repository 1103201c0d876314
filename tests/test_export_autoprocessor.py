"""The native export read back with transformers' code only: AutoModelForImageTextToText + AutoProcessor.

LlavaOnevisionProcessor holds a video processor, and transformers' video processors need torchvision,
which the project's venv lacks (PyPI's torchvision does not import beside its CPU torch): these tests
run in the venv `make test-torchvision` builds, and skip elsewhere. The inputs come from the exported
processor alone (its chat template, its image processor, its token count); our model gets the same
image through our data pipeline. Tolerances as in test_export_hf.py (fp32 logits <= 1e-4).

With torchvision installed, ``AutoProcessor`` picks the torchvision image backend, whose resize is not
PIL's: ``use_fast=False`` gives the PIL backend, the pixels training saw (``backend="pil"`` would also
be asked of the video processor, which has no PIL backend).
"""

from __future__ import annotations

import pytest
import torch
from test_export_hf import (
    IMAGE_SIZE,
    LOGITS_ATOL,
    MESSAGES,
    TEMPLATE,
    _collapse,
    _image,
    _model,
    _ours_inputs,
)

from llava_train.export import export_hf
from llava_train.export.hf_onevision import write_processor_files

try:
    import torchvision  # noqa: F401

    TORCHVISION_ERROR = None
except Exception as e:  # PyPI's build beside our CPU torch raises RuntimeError, not ImportError
    TORCHVISION_ERROR = f"{type(e).__name__}: {e}".splitlines()[0]

pytestmark = [
    pytest.mark.torchvision,
    pytest.mark.skipif(
        TORCHVISION_ERROR is not None,
        reason=f"torchvision does not import ({TORCHVISION_ERROR}); run `make test-torchvision`",
    ),
]

PROCESSOR = {"llava_next": "LlavaNextProcessor", "llava_onevision": "LlavaOnevisionProcessor"}
GREEDY = 8


@pytest.fixture(scope="module")
def tokenizer():
    from llava_train.data import load_tokenizer

    return load_tokenizer("mistral")


def _processor_inputs(processor, image) -> dict:
    """The exported processor's own chat template, tokenisation and pixels for one image + question."""
    content = [{"type": "image", "image": image}, *MESSAGES[0]["content"][1:]]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


@pytest.mark.parametrize("preset,kind", [("tiny", "llava_next"), ("tiny_qwen2_siglip", "llava_onevision")])
def test_autoprocessor_inputs_give_our_logits_and_greedy_tokens(tokenizer, tmp_path, preset, kind):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = _model(tokenizer, 0, preset)
    export_hf(model, tokenizer, tmp_path, template=TEMPLATE)
    native = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tmp_path, use_fast=False)
    assert native.config.model_type == kind
    assert type(processor).__name__ == PROCESSOR[kind]
    assert type(processor.image_processor).__name__.endswith("Pil")

    image = _image(*IMAGE_SIZE.get(kind, (90, 50)))  # non-square
    inputs = _processor_inputs(processor, image)
    ids, pixels, sizes = _ours_inputs(model, tokenizer, image)
    collapsed, count = _collapse(inputs["input_ids"][0], native.config.image_token_index)
    assert collapsed == ids[0].tolist()
    with torch.no_grad():
        assert count == model.image_features(pixels, sizes)[0].shape[0]
        want = model(input_ids=ids, images=pixels, image_sizes=sizes).logits  # [1, T, V]
        got = native(**inputs).logits  # [1, T, V + 1]: the processor's pixel values, not ours
    vocab = want.shape[-1]
    assert (got[..., :vocab] - want).abs().max().item() <= LOGITS_ATOL

    gen = dict(max_new_tokens=GREEDY, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ours = model.generate(inputs=ids, images=pixels, image_sizes=sizes, **gen)
    theirs = native.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1] :]
    assert theirs.tolist() == ours.tolist()
    assert len(ours[0]) == GREEDY  # no early EOS: all eight tokens compared

    # the default (torchvision) backend: the same ids, pixels within one 8-bit level of training's
    default = AutoProcessor.from_pretrained(tmp_path)
    assert not type(default.image_processor).__name__.endswith("Pil")
    fast = _processor_inputs(default, image)
    assert torch.equal(fast["input_ids"], inputs["input_ids"])
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    levels = ((fast["pixel_values"] - inputs["pixel_values"]).abs() * std * 255).max().item()
    assert levels <= 1 + 1e-4


def test_onevision_files_written_without_torchvision_load_the_same_processor(tokenizer, tmp_path):
    """What the export writes on a machine without torchvision: AutoProcessor builds the same inputs."""
    from transformers import AutoProcessor, AutoTokenizer

    model = _model(tokenizer, 0, "tiny_qwen2_siglip")
    export_hf(model, tokenizer, tmp_path / "object", template=TEMPLATE)
    native_tok = AutoTokenizer.from_pretrained(tmp_path / "object")  # with <image> and the chat template
    write_processor_files(model, native_tok, tmp_path / "files", native_tok.chat_template)
    assert not (tmp_path / "files" / "video_preprocessor_config.json").exists()

    image = _image(*IMAGE_SIZE["llava_onevision"])
    both = [AutoProcessor.from_pretrained(tmp_path / d, use_fast=False) for d in ("object", "files")]
    assert [type(p).__name__ for p in both] == [PROCESSOR["llava_onevision"]] * 2
    a, b = (_processor_inputs(p, image) for p in both)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
