"""Batched generation: identical to one-at-a-time on a tiny random model (fp32), plus sharding helpers."""

import numpy as np
import pytest
import torch
from PIL import Image

from llava_train.data import build_image_processor, get_template, load_tokenizer
from llava_train.eval.generate import (
    decode_reply,
    generate_answers,
    left_pad,
    merge_answer_shards,
    shard_path,
    shard_questions,
    stop_token_ids,
)
from llava_train.eval.questions import Question, read_jsonl, write_jsonl
from llava_train.model import ModelConfig, build_model

# Mixed batch: images of several aspect ratios, text-only rows, prompts of different lengths.
QUESTIONS = [
    Question(0, "What digit is this?", "0.png"),
    Question(1, "Hi"),
    Question(2, "Describe the image in a few words please.", "1.png"),
    Question(3, "What?", "2.png"),
    Question("q4", "A longer text-only question with many words in it, so the batch needs padding."),
]
IMAGE_SIZES = [(40, 30), (56, 56), (20, 70)]
MODEL_VARIANTS = {
    "pad": dict(image_aspect_ratio="pad"),
    "anyres": dict(
        image_aspect_ratio="anyres",
        mm_patch_merge_type="spatial_unpad",
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(IMAGE_SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _tiny(tokenizer, variant: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", **MODEL_VARIANTS[variant]), tokenizer).eval()
    return model, build_image_processor(model.config.mm_vision_config["image_size"])


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_batched_equals_one_at_a_time(tokenizer, image_folder, variant):
    model, processor = _tiny(tokenizer, variant)
    kwargs = dict(template="chatml", max_new_tokens=6, image_folder=image_folder)
    batched = generate_answers(model, tokenizer, processor, QUESTIONS, batch_size=5, **kwargs)
    single = generate_answers(model, tokenizer, processor, QUESTIONS, batch_size=1, **kwargs)
    assert [r["question_id"] for r in batched] == [q.question_id for q in QUESTIONS]
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert all(r["text"] for r in batched)  # a random model still emits tokens
    assert model.config.tokenizer_padding_side == "right"  # restored after generation
    assert batched[0]["prompt"].endswith(
        "<|im_start|>user\n<image>\nWhat digit is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<image>" not in batched[1]["prompt"]


def test_transparent_pixels_are_filled_with_the_training_colour(tokenizer, tmp_path):
    """Training fills transparency with the processor's mean colour (which normalises to ~0); eval must too."""
    from llava_train.eval.generate import _batch_images

    Image.new("RGBA", (56, 56), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    model, processor = _tiny(tokenizer, "pad")
    pixels = _batch_images([Question(0, "What?", "clear.png")], model, processor, tmp_path)["images"]
    assert pixels.abs().max() < 0.02  # white would give (1 - mean) / std, about 1.9


def test_a_template_the_tokenizer_cannot_stop_is_refused(image_folder):
    """chatml on a tokenizer without <|im_end|>: replies would never stop; refused up front instead."""
    mistral = load_tokenizer("mistral")
    model, processor = _tiny(mistral, "pad")
    with pytest.raises(ValueError, match="im_end"):
        generate_answers(
            model, mistral, processor, QUESTIONS[:1], template="chatml", image_folder=image_folder
        )


def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_stop_tokens_and_decode(tokenizer):
    stops = stop_token_ids(tokenizer, get_template("chatml"))
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops
    hello = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    row = torch.tensor(hello + [stops[0]] + hello)
    assert decode_reply(row, tokenizer, stops) == "Hello there"


def test_shards_cover_all_questions_and_merge_in_order(tmp_path):
    world = 3
    shards = [shard_questions(QUESTIONS, r, world) for r in range(world)]
    assert sorted(len(s) for s in shards) == [1, 2, 2]
    answers = tmp_path / "answers.jsonl"
    for rank, part in enumerate(shards):
        write_jsonl(
            [{"question_id": q.question_id, "text": f"r{rank}"} for q in part], shard_path(answers, rank)
        )
    merged = merge_answer_shards(answers, QUESTIONS, world)
    assert (
        [r["question_id"] for r in read_jsonl(answers)]
        == [q.question_id for q in QUESTIONS]
        == [r["question_id"] for r in merged]
    )
    assert not list(tmp_path.glob("*.rank*"))
    with pytest.raises(ValueError, match="outside world size"):
        shard_questions(QUESTIONS, 3, 3)


def test_merge_fails_when_a_rank_is_missing(tmp_path):
    answers = tmp_path / "a.jsonl"
    write_jsonl([{"question_id": 0, "text": "x"}], shard_path(answers, 0))
    write_jsonl([], shard_path(answers, 1))
    with pytest.raises(RuntimeError, match="lack 4 questions"):
        merge_answer_shards(answers, QUESTIONS, 2)


@pytest.mark.slow
def test_real_smollm2_llm_batched_equals_single_and_answers(tokenizer, image_folder):
    """SmolLM2-135M-Instruct as the LLM (tiny random tower): real text, same answers batched or not."""
    from llava_train.pretrained import smollm2_135m_checkpoint

    cfg = ModelConfig(preset="tiny", llm_path=str(smollm2_135m_checkpoint()), image_aspect_ratio="pad")
    model = build_model(cfg, tokenizer).eval()
    processor = build_image_processor(model.config.mm_vision_config["image_size"])
    questions = [
        Question(0, "What is the capital of France?"),
        Question(1, "Name one primary colour."),
        Question(2, "What digit is this?", "0.png"),
        Question(3, "Say hello in one short sentence, please, to a friend."),
    ]
    kwargs = dict(template="chatml", max_new_tokens=12, image_folder=image_folder)
    batched = generate_answers(model, tokenizer, processor, questions, batch_size=4, **kwargs)
    single = generate_answers(model, tokenizer, processor, questions, batch_size=1, **kwargs)
    assert [r["text"] for r in batched] == [r["text"] for r in single]
    assert "Paris" in batched[0]["text"], batched[0]["text"]
    assert "<|im_end|>" not in batched[0]["text"]
