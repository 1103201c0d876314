"""The real LLMs: SmolLM2-135M-Instruct (smollm2_135m, tiny CLIP tower, LlavaNext) and Gemma 3 270M
(gemma3_270m, tiny SigLIP tower, OneVision's merge): a few stage-2 LoRA steps, merged and exported to the
transformers-native format, which gives our model's logits and tokens."""

from __future__ import annotations

import pytest
import torch
from test_export_hf import _image, _native_pixels, _ours_inputs
from train_utils import compose_config, logged_losses, make_colour_dataset, run_steps, tiny_overrides

from llava_train.config import to_typed
from llava_train.export import export_hf, merge_lora
from llava_train.train import steps

LOGITS_ATOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    "model,native_type", [("smollm2_135m", "llava_next"), ("gemma3_270m", "llava_onevision")]
)
def test_real_llm_lora_steps_then_native_export(tmp_path, model, native_type):
    from transformers import AutoModelForImageTextToText

    data_json = make_colour_dataset(tmp_path / "data", n=16)

    def overrides():
        return compose_config(
            [
                f"model={model}",
                "+stage=finetune_lora",
                "stage.pretrain_mm_mlp_adapter=null",
                "stage.lora.r=8",
                "stage.lora.alpha=16",
                *tiny_overrides(data_json, tmp_path / "run0", max_steps=4),
            ]
        )

    # 1. the base: SmolLM2 + a random tiny tower + projector, saved like a pretrained LLaVA checkpoint
    base_cfg = to_typed(overrides())
    tokenizer = steps.build_tokenizer(base_cfg)
    torch.manual_seed(0)
    steps.build_model(base_cfg, tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")  # as a pretrained checkpoint ships it (gemma3_270m reads it)
    # 2. LoRA steps from that base
    trainer, _, _ = run_steps(
        compose_config(
            [
                f"model={model}",
                f"model.llm_path={tmp_path / 'base'}",
                "+stage=finetune_lora",
                "stage.pretrain_mm_mlp_adapter=null",
                "stage.lora.r=8",
                "stage.lora.alpha=16",
                *tiny_overrides(data_json, tmp_path / "run", max_steps=4, learning_rate=1e-3),
            ]
        )
    )
    losses = logged_losses(trainer)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    # 3. merge + native export: same logits and greedy tokens as our merged model
    merged = merge_lora(tmp_path / "base", tmp_path / "run").eval()
    export_hf(merged, tokenizer, tmp_path / "hf")
    native = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert native.config.model_type == native_type
    ids, pixels, sizes = _ours_inputs(merged, tokenizer, _image())
    image_id = native.config.image_token_index
    with torch.no_grad():
        n_features = merged.image_features(pixels, sizes)[0].shape[0]
        pos = int((ids[0] == -200).nonzero())
        native_ids = torch.cat([ids[0, :pos], torch.full((n_features,), image_id), ids[0, pos + 1 :]])[None]
        kwargs = dict(
            input_ids=native_ids,
            pixel_values=_native_pixels(pixels),
            image_sizes=torch.tensor([[h, w] for w, h in sizes]),
        )
        want = merged(input_ids=ids, images=pixels, image_sizes=sizes).logits
        got = native(**kwargs).logits
        assert (got[..., : want.shape[-1]] - want).abs().max().item() <= LOGITS_ATOL
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        ours = merged.generate(inputs=ids, images=pixels, image_sizes=sizes, **gen)
        theirs = native.generate(**kwargs, **gen)[:, native_ids.shape[1] :]
    assert theirs.tolist() == ours.tolist()
