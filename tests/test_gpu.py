"""CUDA checks (marker ``gpu``; ``make test-gpu``): the model on a GPU computes what it computes on the CPU.

fp32 with TF32 off, so CPU and GPU agree to rounding: logits, loss and gradients of the multimodal
forward (pad and anyres/spatial_unpad), packed == unpacked, batched generation; then a bf16 train step.
Skipped on a machine without CUDA. The 1.4B throughput / ZeRO check is ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from test_packing import _loss_and_grads, _model, _samples, _supervised

from llava_train.constants import IGNORE_INDEX
from llava_train.data import build_image_processor, load_tokenizer
from llava_train.data.collator import DataCollator
from llava_train.data.packing import PackingCollator
from llava_train.eval.generate import generate_answers
from llava_train.eval.questions import Question
from llava_train.model import ModelConfig, build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CASES = [("pad", "flat"), ("anyres", "spatial_unpad")]


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 matmuls / convolutions round to 10 mantissa bits: off, so fp32 GPU results match the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _to(batch: dict, device: str) -> dict:
    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [x.to(device) for x in v]
        return v

    return {k: move(v) for k, v in batch.items()}


def _grads_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name].cpu(), ref[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("aspect,merge", CASES)
def test_cuda_forward_and_backward_match_cpu(aspect, merge):
    model = _model(aspect, merge)
    samples = _samples(model, [1, 0, 2, 1])
    n = _supervised(samples)
    batch = DataCollator(0)(samples)
    loss_cpu, grads_cpu = _loss_and_grads(model, batch, n)
    with torch.no_grad():
        logits_cpu = model(**{k: v for k, v in batch.items() if k != "sample_ids"}).logits
    model.cuda()
    loss, grads = _loss_and_grads(model, _to(batch, "cuda"), n)
    with torch.no_grad():
        logits = model(**{k: v for k, v in _to(batch, "cuda").items() if k != "sample_ids"}).logits
    assert logits.device.type == "cuda"
    torch.testing.assert_close(logits.cpu(), logits_cpu, rtol=0, atol=1e-4)
    torch.testing.assert_close(loss.cpu(), loss_cpu, rtol=1e-5, atol=1e-6)
    _grads_close(grads, grads_cpu)


@pytest.mark.parametrize("aspect,merge", CASES)
def test_cuda_packed_equals_unpacked(aspect, merge):
    model = _model(aspect, merge).cuda()
    samples = _samples(model, [1, 0, 2, 1, 0])
    n = _supervised(samples)
    for s in samples:  # unpacked: token 0's label is never a target either (as in test_packing)
        s["labels"][0] = IGNORE_INDEX
    loss_ref, grads_ref = _loss_and_grads(model, _to(DataCollator(0)(samples), "cuda"), n)
    loss, grads = _loss_and_grads(model, _to(PackingCollator(0)([samples[:3], samples[3:]]), "cuda"), n)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    _grads_close(grads, {k: v.cpu() for k, v in grads_ref.items()})


def _pair(attn: str, preset: str) -> tuple:
    """(sdpa model, ``attn`` model with its weights, both on CUDA), samples, supervised count."""
    ref = _model("pad", "flat", "sdpa", preset).cuda()
    model = _model("pad", "flat", attn, preset)
    model.load_state_dict(ref.state_dict())
    samples = _samples(ref, [1, 0, 2, 1, 0])
    n = _supervised(samples)
    for s in samples:  # unpacked: token 0's label is never a target either
        s["labels"][0] = IGNORE_INDEX
    return ref, model.cuda(), samples, n


@pytest.mark.parametrize(
    "attn,preset",  # Gemma 3: sliding-window layers too (a windowed BlockMask / banded per-sample mask)
    [
        ("flex_attention", "tiny"),
        ("flex_attention", "tiny_gemma3"),
        ("sdpa_varlen", "tiny"),
        ("sdpa_varlen", "tiny_gemma3"),
    ],
)
def test_cuda_packed_flex_and_varlen_equal_unpacked_sdpa(attn, preset):
    """flex_attention's document-causal BlockMask and sdpa_varlen's per-sample calls (packed rows) give the
    unpacked sdpa loss and grads, and still run unpacked batches."""
    ref, flex, samples, n = _pair(attn, preset)
    loss_ref, grads_ref = _loss_and_grads(ref, _to(DataCollator(0)(samples), "cuda"), n)
    loss, grads = _loss_and_grads(flex, _to(PackingCollator(0)([samples[:3], samples[3:]]), "cuda"), n)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    _grads_close(grads, {k: v.cpu() for k, v in grads_ref.items()})
    loss_unpacked, _ = _loss_and_grads(flex, _to(DataCollator(0)(samples), "cuda"), n)  # still works
    torch.testing.assert_close(loss_unpacked, loss_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")
@pytest.mark.parametrize("preset", ["tiny", "tiny_mistral"])
def test_cuda_packed_flash_equals_unpacked_sdpa(preset):
    """flash_attention_2 varlen (no mask, restarting position ids) under bf16 autocast == unpacked sdpa."""
    ref, flash, samples, n = _pair("flash_attention_2", preset)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # flash-attn computes in bf16 / fp16 only
        loss_ref, grads_ref = _loss_and_grads(ref, _to(DataCollator(0)(samples), "cuda"), n)
        loss, grads = _loss_and_grads(flash, _to(PackingCollator(0)([samples[:3], samples[3:]]), "cuda"), n)
        loss_unpacked, _ = _loss_and_grads(flash, _to(DataCollator(0)(samples), "cuda"), n)
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(loss_unpacked, loss_ref, rtol=2e-2, atol=1e-3)
    assert grads.keys() == grads_ref.keys()
    for name, ref_grad in grads_ref.items():  # bf16 rounding: compare each gradient as a whole
        error = (grads[name] - ref_grad).norm() / ref_grad.norm().clamp(min=1e-8)
        assert error < 5e-2, (name, float(error))


def test_cuda_bf16_steps_are_finite_and_learn():
    model = _model("anyres", "spatial_unpad").to("cuda", torch.bfloat16).train()
    samples = _samples(model, [1, 2, 0, 1])
    batch = _to(DataCollator(0)(samples), "cuda")
    batch = {k: v for k, v in batch.items() if k != "sample_ids"}
    batch["images"] = [x.bfloat16() for x in batch["images"]]
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):  # one batch, memorised: the loss must fall
        optim.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optim.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("aspect,merge", CASES)
def test_cuda_batched_generation_matches_cpu(tmp_path, aspect, merge):
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (56, 56), (20, 70)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    questions = [
        Question(0, "What digit is this?", "0.png"),
        Question(1, "Hi"),
        Question(2, "Describe the image in a few words please.", "1.png"),
        Question(3, "What?", "2.png"),
    ]
    tokenizer = load_tokenizer("mistral")
    torch.manual_seed(0)
    extra = {"image_grid_pinpoints": [[56, 112], [112, 56], [112, 112]]} if aspect == "anyres" else {}
    cfg = ModelConfig(preset="tiny", image_aspect_ratio=aspect, mm_patch_merge_type=merge, **extra)
    model = build_model(cfg, tokenizer).eval()
    processor = build_image_processor(model.config.mm_vision_config["image_size"])
    kwargs = dict(template="vicuna_v1", max_new_tokens=6, image_folder=tmp_path, batch_size=4)
    on_cpu = generate_answers(model, tokenizer, processor, questions, **kwargs)
    model.cuda()
    on_gpu = generate_answers(model, tokenizer, processor, questions, **kwargs)
    one_by_one = generate_answers(model, tokenizer, processor, questions, **{**kwargs, "batch_size": 1})
    assert [r["text"] for r in on_gpu] == [r["text"] for r in on_cpu] == [r["text"] for r in one_by_one]
    assert all(r["text"] for r in on_gpu)


# ---- liger-kernel (training.liger_kernel, the `liger` extra): fused kernels == the plain path ----------------
LIGER_FAMILIES = [
    ("tiny", "llama", None),
    ("tiny_qwen3", "qwen3", None),
    ("tiny_gemma3", "gemma3", 0.5),
]  # a cap that bites


@pytest.fixture
def _restore_transformers_modeling():
    """liger's patch functions replace classes and rotary functions in transformers' modeling modules: put
    them back, so the models of later tests are plain."""
    import importlib

    names = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]
    modules = [importlib.import_module(f"transformers.models.{n}.modeling_{n}") for n in names]
    saved = [dict(vars(m)) for m in modules]
    yield
    for module, state in zip(modules, saved):
        vars(module).update(state)


@pytest.mark.parametrize("preset,family,softcap", LIGER_FAMILIES)
def test_liger_kernels_match_the_plain_path(_restore_transformers_modeling, preset, family, softcap):
    pytest.importorskip("liger_kernel", reason="the liger extra: pip install -e '.[liger]'")
    from llava_train.model.liger import apply_liger, check_liger

    check_liger()
    model = _model("anyres", "spatial_unpad", preset=preset).cuda().train()
    model.config.final_logit_softcapping = softcap  # Gemma 3's softcap goes through liger's fused loss
    samples = _samples(model, [1, 0, 2, 1])
    n = _supervised(samples)
    batch = _to(DataCollator(0)(samples), "cuda")
    loss_ref, grads_ref = _loss_and_grads(model, batch, n)  # plain: before liger patches anything
    apply_liger(model, family)
    decoder = model.get_model()
    patched = [decoder.norm.forward, decoder.layers[0].mlp.forward, decoder.layers[0].input_layernorm.forward]
    assert all("liger" in f.__func__.__module__ for f in patched), [f.__func__.__module__ for f in patched]
    assert model.fused_linear_cross_entropy is not None
    loss, grads = _loss_and_grads(model, batch, n)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)
