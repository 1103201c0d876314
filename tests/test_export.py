"""LoRA merge (explicit base + adapter dir) and original-layout / projector-only release files.

Tolerance: merged vs unmerged logits, fp32, max abs diff <= 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_train.config import LlmTuning, LoraConfig, StageConfig
from llava_train.constants import IMAGE_TOKEN_INDEX
from llava_train.export import load_original, load_projector, merge_lora, merge_pretrain
from llava_train.model import ModelConfig, build_model
from llava_train.train.checkpoint import save_stage_weights
from llava_train.train.stages import apply_stage

MERGE_ATOL = 1e-5
IDS = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7]])
SIZES = [(90, 50)]


def _tiny(seed: int = 0, preset: str = "tiny"):
    torch.manual_seed(seed)
    return build_model(ModelConfig(preset=preset)).eval()


def _images(model):
    torch.manual_seed(1)
    return [torch.randn(3, 3, 56, 56)]  # 90x50 -> a 2 x 1 grid: [1 + 2, 3, S, S]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, images=_images(model), image_sizes=SIZES).logits


@torch.no_grad()
def _lora_run(base_dir, adapter_dir, preset: str = "tiny"):
    """A finetune_lora 'run': base saved, LoRA + projector perturbed, checkpoint files as the trainer writes."""
    model = _tiny(preset=preset)
    model.save_pretrained(base_dir)
    stage = StageConfig(name="finetune_lora", pretrain_mm_mlp_adapter=None, lora=LoraConfig(r=4, alpha=8))
    peft_model = apply_stage(model, stage)
    for p in peft_model.parameters():
        if p.requires_grad:  # lora_B starts at zero: move everything trainable so the merge matters
            p.add_(0.05 * torch.randn_like(p))
    state = peft_model.state_dict()
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    save_stage_weights(str(adapter_dir), LlmTuning.lora, state, trainable)
    lora_state = {k: v for k, v in state.items() if ".lora_" in k}
    peft_model.save_pretrained(str(adapter_dir), state_dict=lora_state, safe_serialization=True)
    return peft_model.eval()


@pytest.mark.parametrize(
    "preset,cls", [("tiny", "LlavaLlamaForCausalLM"), ("tiny_gemma3", "LlavaGemma3ForCausalLM")]
)
def test_merge_lora_same_logits(tmp_path, preset, cls):
    unmerged = _lora_run(tmp_path / "base", tmp_path / "ckpt", preset)
    want = _logits(unmerged)
    merged = merge_lora(tmp_path / "base", tmp_path / "ckpt")
    assert type(merged).__name__ == cls  # the base's family, every weight (Gemma's extra norms) loaded
    assert not any(".lora_" in n for n, _ in merged.named_parameters())
    assert (_logits(merged) - want).abs().max().item() <= MERGE_ATOL
    assert (_logits(_tiny(preset=preset)) - want).abs().max().item() > 1e-3  # the adapter did change it
    merged.save_pretrained(tmp_path / "merged")
    assert (_logits(load_original(tmp_path / "merged")) - want).abs().max().item() <= MERGE_ATOL


def test_merge_lora_fails_loudly(tmp_path):
    with pytest.raises(FileNotFoundError, match="non_lora_trainables"):
        merge_lora(_tiny(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        merge_lora(tmp_path / "nowhere", tmp_path)


def _original_layout(model, path):
    """model_type "llava", no mm_vision_config (tower named by a local CLIP dir), `vision_model.` keys."""
    tower = model.get_vision_tower().vision_tower
    tower.config.save_pretrained(path / "clip")
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="llava", mm_vision_tower=str(path / "clip"), architectures=["LlavaLlamaForCausalLM"]
    )
    config.pop("mm_vision_config")
    (path / "config.json").write_text(json.dumps(config))
    prefix = "model.vision_tower.vision_tower."
    state = load_file(str(path / "model.safetensors"))
    state = {k.replace(prefix, prefix + "vision_model."): v for k, v in state.items()}
    assert "model.mm_projector.0.weight" in state
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_original_layout_checkpoint_loads(tmp_path):
    model = _tiny(3)
    _original_layout(model, tmp_path)
    loaded = load_original(tmp_path)
    assert loaded.config.mm_vision_config is None
    assert (_logits(loaded) - _logits(model)).abs().max().item() == 0
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    with pytest.raises(ValueError, match="import_hf"):
        load_original(tmp_path)


def test_unpad_rounding_round_trips_through_the_original_layout(tmp_path):
    """mm_unpad_rounding is saved and loaded with the checkpoint; a config.json without it (the original's
    releases) loads as round; a wrong value fails at load with the fix."""
    from llava_train.data.config import VisionSpec

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", mm_unpad_rounding="floor")).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["mm_unpad_rounding"] == "floor"
    loaded = load_original(tmp_path)
    assert loaded.config.mm_unpad_rounding == VisionSpec.from_model(loaded).mm_unpad_rounding == "floor"
    images, sizes = [torch.randn(4, 3, 56, 56)], [(47, 188)]  # a 1 x 3 grid; floor keeps 2 of 4 columns
    with torch.no_grad():
        want = model(input_ids=IDS, images=images, image_sizes=sizes).logits
        got = loaded(input_ids=IDS, images=images, image_sizes=sizes).logits
    assert want.shape[1] == IDS.shape[1] - 1 + VisionSpec.from_model(loaded).image_tokens((47, 188))
    assert torch.equal(got, want)
    del config["mm_unpad_rounding"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert load_original(tmp_path).config.mm_unpad_rounding == "round"
    (tmp_path / "config.json").write_text(json.dumps({**config, "mm_unpad_rounding": "Floor"}))
    with pytest.raises(Exception, match="mm_unpad_rounding='Floor'; use 'round'"):
        load_original(tmp_path)


@pytest.mark.parametrize("suffix", ["bin", "safetensors"])
def test_projector_only_release_file(tmp_path, suffix):
    source, target = _tiny(4), _tiny(5)
    state = {f"model.mm_projector.{k}": v.clone() for k, v in source.model.mm_projector.state_dict().items()}
    path = tmp_path / f"mm_projector.{suffix}"
    torch.save(state, path) if suffix == "bin" else save_file(state, str(path))
    load_projector(target, path)
    for key, value in source.model.mm_projector.state_dict().items():
        assert torch.equal(target.model.mm_projector.state_dict()[key], value)
    save_file({"model.mm_projector.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        load_projector(target, tmp_path / "bad.safetensors")


def test_run_export_merge_hf_import_chain(tmp_path):
    """The three entry-point operations in sequence: merge -> native -> ours, logits kept throughout."""
    from llava_train.export.run import ExportConfig, ExportOp, run_export

    want = _logits(_lora_run(tmp_path / "base", tmp_path / "ckpt"))
    merged = run_export(ExportConfig(op=ExportOp.merge, out_dir=str(tmp_path / "merged"),
                                     model_dir=str(tmp_path / "base"), adapter_dir=str(tmp_path / "ckpt")))  # fmt: skip
    native = run_export(ExportConfig(op=ExportOp.hf, out_dir=str(tmp_path / "hf"), model_dir=str(merged),
                                     tokenizer="mistral"))  # fmt: skip
    assert json.loads((native / "config.json").read_text())["model_type"] == "llava_next"
    ours = run_export(
        ExportConfig(op=ExportOp.import_hf, out_dir=str(tmp_path / "ours"), model_dir=str(native))
    )
    got = _logits(load_original(ours))[..., : want.shape[-1]]
    assert (got - want).abs().max().item() <= MERGE_ATOL
    with pytest.raises(ValueError, match="adapter_dir=..."):
        run_export(ExportConfig(op=ExportOp.merge, out_dir=str(tmp_path / "x"), model_dir=str(merged)))


def test_launch_export_cli_typo_fails_at_start():
    import subprocess
    import sys

    cmd = [sys.executable, "launch/export.py", "op=merge", "out_dir=x", "adaptor_dir=y"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "adaptor_dir" in result.stderr + result.stdout


@torch.no_grad()
def test_merge_pretrain_folds_stage1_projector_and_tower(tmp_path):
    """A pretrain run that tuned projector + tower, folded into the base: same logits as the trained model."""
    _tiny().save_pretrained(tmp_path / "base")
    trained = _tiny()
    stage = StageConfig(name="pretrain", pretrain_mm_mlp_adapter=None, tune_vision_tower=True)
    trained = apply_stage(trained, stage)
    for p in trained.parameters():
        if p.requires_grad:
            p.add_(0.05 * torch.randn_like(p))
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    written = save_stage_weights(str(tmp_path / "s1"), LlmTuning.frozen, trained.state_dict(), trainable)
    assert written == ["mm_projector.safetensors", "vision_tower.safetensors"]
    merged = merge_pretrain(tmp_path / "base", tmp_path / "s1")
    assert torch.equal(_logits(merged), _logits(trained.eval()))
    assert not torch.equal(_logits(merged), _logits(_tiny()))
    with pytest.raises(FileNotFoundError, match="pretrain"):
        merge_pretrain(tmp_path / "base", tmp_path / "base")


@torch.no_grad()
def test_pretrain_rerun_without_tower_drops_the_stale_tower_file(tmp_path):
    """A frozen-tower run into a dir an earlier tower-tuning run wrote: the old tower must not be merged."""
    _tiny().save_pretrained(tmp_path / "base")
    model = apply_stage(
        _tiny(), StageConfig(name="pretrain", pretrain_mm_mlp_adapter=None, tune_vision_tower=True)
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    save_stage_weights(str(tmp_path / "s1"), LlmTuning.frozen, model.state_dict(), trainable)
    assert (tmp_path / "s1" / "vision_tower.safetensors").is_file()
    projector_only = {n for n in trainable if "vision_tower" not in n}
    written = save_stage_weights(str(tmp_path / "s1"), LlmTuning.frozen, model.state_dict(), projector_only)
    assert written == ["mm_projector.safetensors"]
    assert not (tmp_path / "s1" / "vision_tower.safetensors").exists()
    merge_pretrain(tmp_path / "base", tmp_path / "s1")  # loads: only the projector is folded
