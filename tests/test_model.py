"""LLaVA model: 7B presets on the meta device, generation, checkpoints and original key names."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.model import (
    LlavaLlamaForCausalLM,
    ModelConfig,
    build_llava_config,
    build_model,
    build_vision_projector,
    build_vision_tower,
)
from llava_train.model.anyres import get_anyres_image_grid_shape
from llava_train.model.projector import load_projector


def _llama_params(vocab, hidden, inter, layers):
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    return 2 * vocab * hidden + layers * per_layer + hidden  # embed + lm_head, layers, final norm


def _clip_vision_params(hidden, inter, layers, patch, image):
    tokens = (image // patch) ** 2 + 1
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * inter + inter + hidden + 4 * hidden
    embed = 3 * patch * patch * hidden + hidden + tokens * hidden  # conv (no bias), class, positions
    return embed + 2 * 2 * hidden + layers * per_layer  # pre/post layer norms


def test_v16_preset_on_meta_device_matches_release():
    """Compared to: Llama-2-7B (6.738B) + CLIP-L/14-336 (303.5M) + mlp2x projector (21.0M) + newline."""
    with torch.device("meta"):
        model = LlavaLlamaForCausalLM(build_llava_config(ModelConfig(preset="llava-v1.6-vicuna-7b")))
    llm = _llama_params(32000, 4096, 11008, 32)
    assert llm == 6_738_415_616
    clip = _clip_vision_params(1024, 4096, 24, 14, 336)
    projector = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    expected = llm + clip + projector + 4096  # = 7,062,906,880 (the release's ~7.06B)
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - expected) / expected < 0.01
    assert abs(total - 7.06e9) / 7.06e9 < 0.01
    c = model.config
    seed_table = dict(
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tokenizer_model_max_length=4096,
        tokenizer_padding_side="right", hidden_act="silu", hidden_size=4096, intermediate_size=11008,
        max_position_embeddings=4096, num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32,
        initializer_range=0.02, rms_norm_eps=1e-5, mm_vision_tower="openai/clip-vit-large-patch14-336",
        image_aspect_ratio="anyres", mm_hidden_size=1024, mm_patch_merge_type="spatial_unpad",
        mm_projector_type="mlp2x_gelu", mm_vision_select_feature="patch", mm_vision_select_layer=-2,
        pretraining_tp=1, tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0,
        mm_use_im_patch_token=False, mm_use_im_start_end=False, use_cache=True, use_mm_proj=True,
        vocab_size=32000, model_type="llava_llama",
    )  # fmt: skip
    assert {k: getattr(c, k) for k in seed_table} == seed_table
    assert c.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert c.rope_parameters["rope_theta"] == 10000
    assert model.get_vision_tower().num_patches == 576


def test_v15_preset_on_meta_device():
    with torch.device("meta"):
        model = LlavaLlamaForCausalLM(build_llava_config(ModelConfig(preset="llava-v1.5-7b")))
    assert model.config.image_aspect_ratio == "pad" and model.config.mm_patch_merge_type == "flat"
    assert not hasattr(model.get_model(), "image_newline")
    assert abs(sum(p.numel() for p in model.parameters()) - 7.0629e9) / 7.06e9 < 0.01


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny")).eval()


def _image_batch(model, sizes):
    side = model.get_vision_tower().image_size
    images = []
    for size in sizes:
        num_w, num_h = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, side)
        images.append(torch.randn(1 + num_w * num_h, 3, side, side))
    return images


def _greedy_without_cache(model, ids, images, sizes, steps):
    out = ids
    for _ in range(steps):
        logits = model(input_ids=out, images=images, image_sizes=sizes, use_cache=False).logits
        out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=1)
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("with_image", [True, False])
def test_generate_kv_cache_matches_full_recompute(tiny, with_image):
    torch.manual_seed(1)
    ids = (
        torch.tensor([[1, 23, IMAGE_TOKEN_INDEX, 45, 67]]) if with_image else torch.tensor([[1, 23, 45, 67]])
    )
    sizes = [(90, 40)] if with_image else None
    images = _image_batch(tiny, sizes) if with_image else None
    with torch.no_grad():
        cached = tiny.generate(ids, images=images, image_sizes=sizes, max_new_tokens=6, do_sample=False)
        full = _greedy_without_cache(tiny, ids, images, sizes, 6)
    assert cached.shape == (1, 6)
    assert torch.equal(cached, full)


def test_save_load_round_trip_keeps_logits_and_original_keys(tiny, tmp_path):
    torch.manual_seed(2)
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, 6], [1, 7, 8, 9]])
    sizes = [(60, 120)]
    images = _image_batch(tiny, sizes)
    tiny.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("model.mm_projector.0.weight", "model.mm_projector.2.weight", "model.image_newline",
                "lm_head.weight", "model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):  # fmt: skip
        assert key in keys, key
    # transformers 5 saves CLIP without the old `vision_model.` level; both layouts load (see below).
    assert any(k.startswith("model.vision_tower.vision_tower.encoder.layers.") for k in keys)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_llama"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LlavaLlamaForCausalLM)
    assert AutoConfig.from_pretrained(tmp_path).mm_vision_config == tiny.config.mm_vision_config
    with torch.no_grad():
        want = tiny(input_ids=ids, images=images, image_sizes=sizes).logits
        got = loaded(input_ids=ids, images=images, image_sizes=sizes).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_original_layout_checkpoint_loads(tiny, tmp_path):
    """Original release layout: model_type "llava", CLIP keys under `vision_tower.vision_tower.vision_model.`."""
    tiny.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(config))
    tower = "model.vision_tower.vision_tower."
    state = load_file(str(tmp_path / "model.safetensors"))
    state = {k.replace(tower, tower + "vision_model."): v for k, v in state.items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = LlavaLlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(loaded.model.image_newline, tiny.model.image_newline)
    fc1 = "encoder.layers.1.mlp.fc1.weight"
    torch.testing.assert_close(
        loaded.model.vision_tower.vision_tower.get_parameter(fc1),
        tiny.model.vision_tower.vision_tower.get_parameter(fc1),
    )


def test_loss_normalised_by_num_items_in_batch(tiny):
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, 7, 8]])
    with torch.no_grad():
        mean = tiny(input_ids=ids, labels=labels).loss
        summed = tiny(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(8)).loss
    torch.testing.assert_close(summed, mean * 4 / 8)


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_pretrained_projector_loads(tmp_path, suffix):
    torch.manual_seed(3)
    source = build_model(ModelConfig(preset="tiny"))
    state = {f"model.mm_projector.{k}": v.clone() for k, v in source.model.mm_projector.state_dict().items()}
    path = tmp_path / f"mm_projector.{suffix}"
    save_file(state, str(path)) if suffix == "safetensors" else torch.save(state, path)
    model = build_model(ModelConfig(preset="tiny"))
    load_projector(model.get_model().mm_projector, str(path))  # what a stage's pretrain_mm_mlp_adapter does
    for key, value in source.model.mm_projector.state_dict().items():
        torch.testing.assert_close(model.model.mm_projector.state_dict()[key], value)
    bad = {k.replace(".2.", ".4."): v for k, v in state.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_projector(model.get_model().mm_projector, str(tmp_path / "bad.safetensors"))


def test_llm_path_loads_plain_llama_checkpoint(tmp_path):
    torch.manual_seed(4)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )  # fmt: skip
    )
    llama.save_pretrained(tmp_path)
    model = build_model(ModelConfig(preset="tiny", llm_path=str(tmp_path)))
    torch.testing.assert_close(
        model.model.layers[0].mlp.up_proj.weight, llama.model.layers[0].mlp.up_proj.weight
    )
    assert model.model.mm_projector[0].weight.shape == (64, 64)
    assert model.config.mm_hidden_size == 64 and model.config.image_aspect_ratio == "anyres"
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]])
    out = model(input_ids=ids, images=_image_batch(model, [(70, 70)]), image_sizes=[(70, 70)], labels=ids)
    assert torch.isfinite(out.loss)


def test_unknown_projector_and_tower_errors():
    config = SimpleNamespace(mm_projector_type="mlp2x_relu", mm_hidden_size=8, hidden_size=16)
    with pytest.raises(ValueError, match="mlp\\{N\\}x_gelu"):
        build_vision_projector(config)
    config.mm_projector_type = "mlp3x_gelu"
    assert len(build_vision_projector(config)) == 5
    with pytest.raises(ValueError, match="unknown vision tower"):
        build_vision_tower(SimpleNamespace(mm_vision_tower="google/siglip-so400m"))
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model(ModelConfig(preset="llava-13b"))


def test_initialize_vision_tokenizer_adds_mean_rows(tiny):
    class FakeTokenizer:
        def __init__(self):
            self.tokens = [f"t{i}" for i in range(tiny.config.vocab_size)]

        def add_tokens(self, tokens, special_tokens=False):
            self.tokens += tokens
            return len(tokens)

        def __len__(self):
            return len(self.tokens)

    torch.manual_seed(5)
    model = build_model(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64))
    args = SimpleNamespace(mm_use_im_patch_token=False, mm_use_im_start_end=True, tune_mm_mlp_adapter=False)
    old = model.get_input_embeddings().weight.detach().clone()
    model.initialize_vision_tokenizer(args, FakeTokenizer())
    new = model.get_input_embeddings().weight
    assert new.shape[0] == old.shape[0] + 2
    torch.testing.assert_close(new[-1].detach(), old.mean(0))


class _Vocab:
    """The tokenizer calls initialize_vision_tokenizer makes."""

    def __init__(self, n: int):
        self.tokens = [f"t{i}" for i in range(n)]

    def add_tokens(self, tokens, special_tokens=False):
        new = [t for t in tokens if t not in self.tokens]
        self.tokens += new
        return len(new)

    def convert_tokens_to_ids(self, tokens):
        return [self.tokens.index(t) for t in tokens]

    def __len__(self):
        return len(self.tokens)


@pytest.mark.parametrize("already_added", [False, True])
def test_stage1_image_token_rows_load_by_id_and_touch_nothing_else(tmp_path, already_added):
    """A tokenizer saved by stage 1 already has <im_start>/<im_end> (no new rows): their stage-1 rows still
    load, and no other row changes (overwriting the whole matrix would change them all)."""
    torch.manual_seed(5)
    model = build_model(ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64))
    vocab = _Vocab(model.config.vocab_size)
    if already_added:
        vocab.add_tokens(["<im_start>", "<im_end>"])
        model.resize_token_embeddings(len(vocab))
    size = (len(vocab) + (0 if already_added else 2), 32)
    save_file(
        {"model.embed_tokens.weight": torch.full(size, 7.0)}, str(tmp_path / "mm_projector.safetensors")
    )
    before = model.get_input_embeddings().weight.detach().clone()
    args = SimpleNamespace(
        mm_use_im_patch_token=False,
        mm_use_im_start_end=True,
        tune_mm_mlp_adapter=False,
        pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.safetensors"),
    )
    model.initialize_vision_tokenizer(args, vocab)
    weight = model.get_input_embeddings().weight.detach()
    rows = vocab.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert rows == [len(vocab) - 2, len(vocab) - 1] and bool((weight[rows] == 7.0).all())
    torch.testing.assert_close(
        weight[: before.shape[0] - (2 if already_added else 0)], before[: weight.shape[0] - 2]
    )


def test_bf16_model_takes_fp32_pixels_and_tensor_image_sizes():
    """Outside autocast (eval scripts, plain loops): fp32 pixels into a bf16 model; sizes as a tensor [n, 2]."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(preset="tiny", hidden_size=32, intermediate_size=64, dtype="bfloat16")
    ).eval()
    tower = model.get_vision_tower()
    sizes = [(112, 56), (56, 56)]
    images = [
        torch.randn(1 + w * h, 3, tower.image_size, tower.image_size)
        for w, h in (
            get_anyres_image_grid_shape(s, model.config.image_grid_pinpoints, tower.image_size) for s in sizes
        )
    ]
    with torch.no_grad():
        as_list = model.image_features(images, sizes)
        as_tensor = model.image_features(images, torch.tensor(sizes))
        ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5, IMAGE_TOKEN_INDEX, 6]])
        logits = model(input_ids=ids, images=images, image_sizes=sizes).logits
    assert all(torch.equal(a, b) for a, b in zip(as_list, as_tensor)) and as_list[0].dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


def test_tied_embeddings_stay_trainable_when_the_adapter_tunes_them():
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="tiny", hidden_size=32, intermediate_size=64, extra={"tie_word_embeddings": True}
    )
    model = build_model(cfg)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    args = SimpleNamespace(mm_use_im_patch_token=False, mm_use_im_start_end=True, tune_mm_mlp_adapter=True)
    model.initialize_vision_tokenizer(args, _Vocab(model.config.vocab_size))
    assert model.get_input_embeddings().weight.requires_grad  # freezing the output froze the shared input
