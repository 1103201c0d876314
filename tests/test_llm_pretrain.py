"""LLM pretraining on plain text (the demo's stand-in for the LLM's own): encoding, training, weights."""

import json
import random

import pytest
import torch

from llava_train.constants import IGNORE_INDEX
from llava_train.data import load_tokenizer
from llava_train.model import ModelConfig, build_model
from llava_train.train.llm_pretrain import (
    LlmPretrainConfig,
    decoder_parameters,
    encode,
    load_decoder_weights,
    load_texts,
    pretrain_llm,
    pretrain_saved_llm,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("mistral")


def tiny(tokenizer):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny", hidden_size=64, intermediate_size=128), tokenizer)


def sums(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        out.append((f"{a} + {b} =", f" {a + b}"))
    return out


def test_encode_supervises_the_completion_and_eos_only(tokenizer):
    ids, labels = encode(tokenizer, "3 + 5 + 8 =", " 16")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    supervised = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(supervised[:-1]).strip() == "16" and supervised[-1] == tokenizer.eos_token_id
    assert labels[: len(ids) - len(supervised)] == [IGNORE_INDEX] * (len(ids) - len(supervised))
    assert ids[len(ids) - len(supervised) :] == supervised  # labels line up with their own tokens


def test_encode_refuses_a_completion_inside_a_token(tokenizer):
    with pytest.raises(ValueError, match="token boundary"):
        encode(tokenizer, "What is the sum", "mary")  # "summary" is one token, not "sum" + "mary"


def test_pretraining_learns_the_sums_and_touches_only_the_decoder(tokenizer):
    model = tiny(tokenizer)
    vision = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "vision_tower" in n or "mm_projector" in n
    }
    head_before = model.lm_head.weight.detach().clone()
    assert not {id(p) for p in decoder_parameters(model)} & {
        id(p) for n, p in model.named_parameters() if n in vision
    }
    texts = sums(1024)
    cfg = LlmPretrainConfig(epochs=2, batch_size=32, lr=1e-2)
    report = pretrain_llm(model, tokenizer, texts, cfg)
    assert report["steps"] == 2 * 32 and report["n_texts"] == 1024
    assert report["loss"][-1] < report["loss"][0] / 3
    assert report["accuracy"] > 0.75  # 25 facts seen ~80 times each (0.86 here); untrained: about 0
    for name, p in model.named_parameters():
        if name in vision:
            assert torch.equal(p, vision[name]), name
    # only the rows of the completions' tokens ("▁", the digits, "</s>") were trained
    changed = (model.lm_head.weight != head_before).any(1).nonzero().flatten().tolist()
    vocab = {t for p, c in texts for t in encode(tokenizer, p, c)[1] if t != IGNORE_INDEX}
    assert set(changed) == vocab and report["vocab"] == len(vocab)


def test_max_steps_stops_early(tokenizer):
    report = pretrain_llm(
        tiny(tokenizer), tokenizer, sums(256), LlmPretrainConfig(batch_size=64, max_steps=2)
    )
    assert report["steps"] == 2 and len(report["loss"]) == 2
    assert report["accuracy"] < 0.2  # two steps teach next to nothing: the accuracy is not a constant


def test_saved_checkpoint_round_trip(tokenizer, tmp_path):
    model = tiny(tokenizer)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    texts = tmp_path / "texts.json"
    texts.write_text(json.dumps([{"prompt": p, "completion": c} for p, c in sums(128)]))
    report = pretrain_saved_llm(
        tmp_path / "base", texts, tmp_path / "llm.safetensors", LlmPretrainConfig(batch_size=64)
    )
    assert report["steps"] == 2
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "llm.safetensors"))
    layer = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(dict(model.named_parameters())[layer], state[layer])  # trained in the other copy
    load_decoder_weights(model, tmp_path / "llm.safetensors")
    params = dict(model.named_parameters())
    assert set(state) == {
        n
        for n, p in params.items()
        if not any(k in n for k in ("vision_tower", "mm_projector", "image_newline"))
    }
    assert all(torch.equal(params[name], tensor) for name, tensor in state.items())

    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_decoder_weights(model, tmp_path / "short.safetensors")


def test_load_texts_names_the_bad_record(tmp_path):
    path = tmp_path / "texts.json"
    path.write_text(json.dumps([{"prompt": "1 + 1 =", "completion": " 2"}, {"prompt": "2 + 2 ="}]))
    with pytest.raises(ValueError, match="record 1"):
        load_texts(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="no texts"):
        load_texts(path)
