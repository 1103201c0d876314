"""Packed attention per ``model.attn_implementation``: the flex BlockMask, the build-time checks.

FlexAttention has no CPU backward in torch 2.13 and its CPU forward runs only through torch.compile
(transformers compiles it on first use: ~1 minute with a warm inductor cache, ~5 minutes cold on the
2-core development VM). So on CPU the fast tests check the BlockMask itself against the sdpa mask (dense,
and block by block: blocks of other samples are skipped) and the errors; one slow test runs the
compiled flex forward, packed and unpacked, against sdpa. Loss and every gradient of the packed flex step
are checked against the unpacked step on CUDA in tests/test_gpu.py.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_packing import _model, _samples, _strip, _supervised
from torch.nn.attention.flex_attention import create_mask

from llava_train.constants import IGNORE_INDEX
from llava_train.data.collator import DataCollator
from llava_train.data.packing import PackingCollator
from llava_train.model import ModelConfig, build_model
from llava_train.model import builder as builder_module
from llava_train.model.merge import document_causal_mask_mod, packed_attention_mask, packed_block_mask


def _seq_ids() -> torch.Tensor:
    """Two rows of 300 tokens (three 128-token blocks): row 0 has samples 1 | 2 | 3 | padding."""
    row0 = [1] * 130 + [2] * 100 + [3] * 50 + [0] * 20
    row1 = [1] * 300
    return torch.tensor([row0, row1])


@pytest.mark.parametrize("window", [None, 8, 200])
def test_block_mask_is_the_sdpa_mask(window):
    seq = _seq_ids()
    b, t = seq.shape
    dense = create_mask(document_causal_mask_mod(seq, window), b, 1, t, t, device="cpu")  # [b, 1, T, T]
    assert torch.equal(dense, packed_attention_mask(seq, "sdpa", torch.float32, window))
    block = packed_block_mask(seq, window)
    assert block.shape == (b, 1, t, t)
    # A block is computed iff some (q, kv) in it is allowed: nothing allowed is skipped, no empty block runs.
    nb = -(-t // 128)
    padded = torch.zeros(b, 1, nb * 128, nb * 128, dtype=torch.bool)
    padded[..., :t, :t] = dense
    any_allowed = padded.view(b, 1, nb, 128, nb, 128).any(5).any(3)  # [b, 1, nq, nkv]
    assert torch.equal(block.to_dense().bool(), any_allowed)


def test_block_mask_skips_other_samples():
    block = packed_block_mask(_seq_ids()).to_dense().bool()  # [b, 1, 3, 3] blocks
    # row 0: q block 2 (tokens 256-299: sample 3 and padding) never reads kv block 0 (sample 1 only)
    assert not block[0, 0, 2, 0] and block[1, 0, 2, 0]
    assert not block[:, 0].triu(1).any()  # causal: no block above the diagonal


def test_flex_mask_per_layer_type():
    """Gemma 3 mixes sliding and full layers: one BlockMask each, the sliding one windowed."""
    model = _model("pad", "flat", "flex_attention", "tiny_gemma3")
    seq = _seq_ids()
    masks = model._packed_mask(seq, torch.float32)
    assert set(masks) == {"full_attention", "sliding_attention"}
    window = model.config.sliding_window
    for kind, w in (("full_attention", None), ("sliding_attention", window)):
        dense = create_mask(masks[kind].mask_mod, 2, 1, 300, 300, device="cpu")
        assert torch.equal(dense, packed_attention_mask(seq, "sdpa", torch.float32, w)), kind


def test_flex_refuses_cpu_backward_with_the_fix():
    model = _model("pad", "flat", "flex_attention").train()
    samples = _samples(model, [1, 0])
    with pytest.raises(NotImplementedError, match="attn_implementation=sdpa"):
        model(**PackingCollator(0)([samples]))
    with pytest.raises(NotImplementedError, match="cannot train on CPU"):
        model(**DataCollator(0)(samples))


def test_unknown_attn_implementation_is_refused():
    with pytest.raises(ValueError, match=r"attn_implementation='flash'.*flash_attention_2"):
        build_model(ModelConfig(preset="tiny", attn_implementation="flash"))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_the_package_names_the_fix():
    with pytest.raises(ValueError, match="pip install flash-attn"):
        build_model(ModelConfig(preset="tiny", attn_implementation="flash_attention_2"))


def test_flash_attention_without_cuda_names_the_fix(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: object() if "flash" in name else found(name)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("flash_attention_2", "flash_attention_3"):
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            builder_module.check_attn_implementation(name)


def test_flex_without_flex_in_torch_names_the_fix(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if "flex" in name else found(name))
    with pytest.raises(ValueError, match="torch >= 2.5"):
        builder_module.check_attn_implementation("flex_attention")
    builder_module.check_attn_implementation("sdpa")  # the others do not need it


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "tiny_gemma3"])
def test_compiled_flex_forward_equals_sdpa(preset):
    """Packed flex loss == unpacked sdpa loss (and packed / unpacked flex logits == sdpa's), on CPU.

    Forward only (no CPU backward); transformers compiles flex_attention on the first call.
    """
    ref = _model("pad", "flat", "sdpa", preset)
    flex = _model("pad", "flat", "flex_attention", preset)
    flex.load_state_dict(ref.state_dict())
    samples = _samples(ref, [1, 0, 2, 1, 0])
    n = _supervised(samples)
    for s in samples:
        s["labels"][0] = IGNORE_INDEX
    packed = PackingCollator(0)([samples[:3], samples[3:]])
    unpacked = DataCollator(0)(samples)
    with torch.no_grad():
        torch.testing.assert_close(_loss(flex, packed, n), _loss(ref, unpacked, n), rtol=1e-5, atol=1e-6)
        for batch in (packed, unpacked):
            torch.testing.assert_close(
                flex(**_strip(batch)).logits, ref(**_strip(batch)).logits, rtol=1e-4, atol=1e-5
            )


def _loss(model, batch: dict, n_items: int) -> torch.Tensor:
    batch = {k: v for k, v in batch.items() if k != "sample_ids"}
    return model(**batch, num_items_in_batch=torch.tensor(n_items)).loss
