"""Every LLM family (Llama, Mistral, Qwen2 with SigLIP, Qwen3, Gemma 3) on the shared mixins: the training loss, save and load
through transformers' Auto classes, and the three stages through the trainer (packing included).

Packing per family is in test_packing.py, export per family in test_export_hf.py, ZeRO-3 in
test_distributed.py.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_model import _image_batch
from train_utils import compose_config, logged_losses, make_colour_dataset, run_steps, tiny_overrides
from transformers import AutoModelForCausalLM

from llava_train.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_train.model import FAMILIES, ModelConfig, build_model

PRESETS = ["tiny", "tiny_mistral", "tiny_qwen2_siglip", "tiny_qwen3", "tiny_gemma3"]
FAMILY = {"tiny": "llama", "tiny_mistral": "mistral", "tiny_qwen2_siglip": "qwen2", "tiny_qwen3": "qwen3",
          "tiny_gemma3": "gemma3"}  # fmt: skip


def _model(preset: str):
    torch.manual_seed(0)
    return build_model(ModelConfig(preset=preset)).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_training_mode_loss_and_grads_equal_a_reference_cross_entropy(preset):
    """The loss training runs (train mode: logits of supervised rows only) against a plain cross-entropy over
    the full eval-mode logits, with images, padding and num_items_in_batch; dropout is 0 in the tiny preset."""
    tiny = _model(preset)
    sizes = [(60, 40), (30, 90)]
    images = _image_batch(tiny, sizes)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7, 8, 9], [1, IMAGE_TOKEN_INDEX, 11, 12, 13, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0, 0]])
    labels = torch.tensor(
        [[IGNORE_INDEX] * 4 + [7, 8, 9], [IGNORE_INDEX] * 3 + [12, 13, IGNORE_INDEX, IGNORE_INDEX]]
    )
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels, images=images, image_sizes=sizes)
    params = [
        tiny.lm_head.weight,
        tiny.get_model().mm_projector[0].weight,
        tiny.get_model().layers[0].mlp.up_proj.weight,
    ]
    params += [
        tiny.get_model().layers[-1].self_attn.q_proj.weight,
    ]
    try:
        tiny.train()
        loss = tiny(
            **batch, num_items_in_batch=torch.tensor(9)
        ).loss  # 5 supervised here, 9 over accumulation
        grads = torch.autograd.grad(loss, params)
    finally:
        tiny.eval()
    _, _, new_mask, _, _, new_labels = tiny.prepare_inputs_labels_for_multimodal(
        ids, None, mask, None, labels, images, sizes
    )
    logits = tiny(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [b, T, V], full rows
    targets = new_labels[:, 1:]
    assert int((targets != IGNORE_INDEX).sum()) == 5
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum") / 9  # fmt: skip
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, torch.autograd.grad(want, params)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_family_saves_and_loads_through_the_auto_classes(preset, tmp_path):
    model = _model(preset)
    assert type(model) is FAMILIES[FAMILY[preset]]
    model.save_pretrained(tmp_path)
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    assert model_type == type(model).config_class.model_type
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert {
        "model.mm_projector.0.weight",
        "model.image_newline",
        "model.layers.0.self_attn.q_proj.weight",
    } <= keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7]])
    images, sizes = _image_batch(model, [(60, 40)]), [(60, 40)]
    with torch.no_grad():
        want = model(input_ids=ids, images=images, image_sizes=sizes).logits
        got = loaded(input_ids=ids, images=images, image_sizes=sizes).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.fixture(scope="module")
def data_json(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), n=24)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "tiny"])  # tiny: tests/test_train.py
def test_family_runs_stage1_then_full_and_lora_stage2(preset, data_json, tmp_path):
    """Stage 1 (projector), then stage 2 in full and with LoRA on packed rows, each a few steps."""

    def run(stage: str, run_dir, *extra: str):
        raw = compose_config([f"+stage={stage}", f"model={preset}", "stage.lora.r=4", "stage.lora.alpha=8",
                              *tiny_overrides(data_json, run_dir, learning_rate=2e-3, max_steps=3, save_steps=3),
                              *extra])  # fmt: skip
        trainer, model, _ = run_steps(raw)
        losses = logged_losses(trainer)
        assert len(losses) == 3 and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
        return model

    model = run("pretrain", tmp_path / "s1", "stage.pretrain_mm_mlp_adapter=null")
    assert type(model.get_model()).__name__.startswith("Llava")
    projector = tmp_path / "s1" / "mm_projector.safetensors"
    assert "model.mm_projector.0.weight" in load_file(str(projector))
    run("finetune", tmp_path / "full", f"stage.pretrain_mm_mlp_adapter={projector}")
    assert "model.layers.1.mlp.down_proj.weight" in load_file(str(tmp_path / "full" / "model.safetensors"))
    run("finetune_lora", tmp_path / "lora", f"stage.pretrain_mm_mlp_adapter={projector}", "data.packing=true")
    adapter = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    assert adapter and all(".lora_" in k and ".layers." in k and "vision" not in k for k in adapter)


# Released totals (docs/MODEL_FAMILIES.md: LLM + tower as LLaVA keeps it + mlp2x_gelu projector + newline).
RELEASED_PARAMETERS = {"llava-v1.6-mistral-7b": 7_566_223_360, "llava-onevision-qwen2-7b": 8_030_348_832}


@pytest.mark.parametrize("preset", sorted(RELEASED_PARAMETERS))
def test_released_presets_build_on_meta_with_the_released_parameter_counts(preset):
    with torch.device("meta"):
        model = build_model(ModelConfig(preset=preset))
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMETERS[preset]
    assert type(model).__name__ == {"llava-v1.6-mistral-7b": "LlavaMistralForCausalLM",
                                    "llava-onevision-qwen2-7b": "LlavaQwenForCausalLM"}[preset]  # fmt: skip
    keys = dict(model.named_parameters())
    assert keys["model.mm_projector.0.weight"].shape[1] == model.config.mm_hidden_size
    assert "model.image_newline" in keys


def test_original_layout_onevision_checkpoint_loads(tmp_path):
    """As lmms-lab's OneVision releases are laid out: model_type "llava", the class in `architectures`,
    SigLIP keys under `vision_tower.vision_tower.vision_model.`; load_original picks the family from it."""
    from safetensors.torch import save_file

    from llava_train.export import load_original

    model = _model("tiny_qwen2_siglip")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"], config["architectures"] = "llava", ["LlavaQwenForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    tower = "model.vision_tower.vision_tower."
    state = load_file(str(tmp_path / "model.safetensors"))
    if not any(k.startswith(tower + "vision_model.") for k in state):
        state = {k.replace(tower, tower + "vision_model."): v for k, v in state.items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_original(tmp_path)
    assert type(loaded) is type(model)
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7]])
    images, sizes = _image_batch(model, [(150, 40)]), [(150, 40)]
    with torch.no_grad():
        want = model(input_ids=ids, images=images, image_sizes=sizes).logits
        got = loaded(input_ids=ids, images=images, image_sizes=sizes).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
