"""apply_stage: what trains in each stage, LoRA placement, projector loading, optimizer groups."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from llava_train.config import Config, LlmTuning, LoraConfig, StageConfig, StageName, TrainingConfig
from llava_train.model import ModelConfig, build_model
from llava_train.train.stages import apply_stage, component_of, lora_target_regex, trainable_summary
from llava_train.train.trainer import optimizer_groups


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"))


def _stage(name: str, **kw) -> StageConfig:
    kw.setdefault("pretrain_mm_mlp_adapter", None)
    return StageConfig(name=StageName(name), **kw)


def _states(model) -> dict[str, str]:
    return {
        c: "trainable" if t == n else "frozen" if t == 0 else "partial"
        for c, (t, n) in trainable_summary(model).items()
    }


def test_pretrain_trains_only_the_projector(model, caplog):
    with caplog.at_level(logging.INFO, logger="llava_train.train.stages"):
        model = apply_stage(model, _stage("pretrain"))
    assert _states(model) == {
        "vision_tower": "frozen",
        "projector": "trainable",
        "image_newline": "trainable",
        "llm": "frozen",
        "lm_head": "frozen",
    }
    assert "projector" in caplog.text and "frozen" in caplog.text  # the per-component table is logged


def test_pretrain_can_tune_the_vision_tower(model):
    model = apply_stage(model, _stage("pretrain", tune_vision_tower=True))
    assert _states(model)["vision_tower"] == "trainable" and _states(model)["llm"] == "frozen"


def test_finetune_trains_llm_and_projector_not_the_tower(model):
    model = apply_stage(model, _stage("finetune"))
    states = _states(model)
    assert states["vision_tower"] == "frozen"
    assert {states[c] for c in ("projector", "image_newline", "llm", "lm_head")} == {"trainable"}


def test_lora_only_on_llm_decoder_linears(model):
    lora = LoraConfig(r=4, alpha=8)
    model = apply_stage(model, _stage("finetune_lora", lora=lora))
    wrapped = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if ".lora_A" in n})
    n_layers = model.get_base_model().config.num_hidden_layers
    assert len(wrapped) == 7 * n_layers
    for name in wrapped:
        assert ".model.layers." in name and "vision_tower" not in name and "mm_projector" not in name
        assert name.rsplit(".", 1)[1] in lora.target_modules
    states = _states(model)
    assert states["lora"] == "trainable" and states["projector"] == "trainable"
    assert states["llm"] == "frozen" and states["lm_head"] == "frozen" and states["vision_tower"] == "frozen"
    # The CLIP tower has q_proj / k_proj / v_proj too: the regex must not reach them.
    import re

    regex = lora_target_regex(lora)
    assert not re.fullmatch(
        regex, "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    )
    assert re.fullmatch(regex, "model.layers.0.self_attn.q_proj")


def test_lora_train_embeddings_unfreezes_embed_tokens_and_lm_head_only(model, tmp_path):
    from llava_train.train.checkpoint import save_stage_weights

    model = apply_stage(model, _stage("finetune_lora", lora=LoraConfig(r=4, alpha=8, train_embeddings=True)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    outside_lora = {n for n in trainable if ".lora_" not in n and "mm_projector" not in n}
    assert outside_lora == {
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.image_newline",
    }
    assert _states(model)["lm_head"] == "trainable" and _states(model)["vision_tower"] == "frozen"
    save_stage_weights(str(tmp_path), LlmTuning.lora, model.state_dict(), trainable)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "non_lora_trainables.safetensors"))
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(saved)


def test_qlora_refuses_without_a_gpu(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        apply_stage(model, _stage("finetune_lora", lora=LoraConfig(r=4, qlora=True)))


def test_stage2_loads_the_projector_from_an_explicit_path(model, tmp_path):
    proj = model.get_model().mm_projector
    saved = {f"model.mm_projector.{k}": torch.full_like(v, 0.5) for k, v in proj.state_dict().items()}
    save_file(saved, tmp_path / "mm_projector.safetensors")
    model = apply_stage(
        model, _stage("finetune", pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.safetensors"))
    )
    assert all(torch.all(v == 0.5) for v in model.get_model().mm_projector.state_dict().values())
    bad = {"model.mm_projector.0.weight": torch.zeros(3, 3)}
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="do not fit this projector"):
        apply_stage(model, _stage("finetune", pretrain_mm_mlp_adapter=str(tmp_path / "bad.safetensors")))
    with pytest.raises(FileNotFoundError, match="pretrain_mm_mlp_adapter"):
        apply_stage(model, _stage("finetune", pretrain_mm_mlp_adapter=str(tmp_path / "nope.bin")))


def test_optimizer_groups_lrs_and_no_decay(model):
    model = apply_stage(model, _stage("finetune", tune_vision_tower=True))
    cfg = Config(
        training=TrainingConfig(
            learning_rate=1e-4, mm_projector_lr=1e-5, mm_vision_tower_lr=1e-6, weight_decay=0.1
        )
    )
    groups = optimizer_groups(model, cfg)
    assert groups[0]["lr"] == 1e-4  # the Trainer logs the first group's LR
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            want_lr = {"projector": 1e-5, "image_newline": 1e-5, "vision_tower": 1e-6}.get(
                component_of(n), 1e-4
            )
            assert g["lr"] == want_lr, n
            no_decay = p.ndim < 2 or "bias" in n or "norm" in n
            assert g["weight_decay"] == (0.0 if no_decay else 0.1), n
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_parameters_added_after_a_zero3_build_take_its_dtype():
    """Sharded (ds_id) parameters set the dtype; peft's fp32 LoRA weights and other late parameters follow."""
    from llava_train.train.stages import _match_zero3_dtype

    model = torch.nn.Sequential(torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 4))
    for p in model[0].parameters():
        p.ds_id = 0  # what zero.Init marks its parameters with
    _match_zero3_dtype(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    plain = torch.nn.Linear(4, 4)
    _match_zero3_dtype(plain)  # no sharded parameter: untouched
    assert plain.weight.dtype == torch.float32
