"""training.liger_kernel on a CPU machine: the clear errors (no CUDA, no liger-kernel, ZeRO-3), and the
supervised loss's fused-loss hook fed with a chunked reference of liger's function (same signature), so
the rows, targets, reduction and Gemma's softcap we hand it are checked here; liger itself is checked
against the plain path on a GPU in tests/test_gpu.py."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_packing import _loss_and_grads, _model, _samples, _supervised
from train_utils import compose_config, make_colour_dataset, tiny_overrides

from llava_train.config import to_typed
from llava_train.data.collator import DataCollator
from llava_train.model.liger import check_liger
from llava_train.train import steps


def test_liger_without_cuda_fails_before_the_model_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = make_colour_dataset(tmp_path / "colours", n=8)
    overrides = ["+stage=finetune", "stage.pretrain_mm_mlp_adapter=null", "training.liger_kernel=true"]
    cfg = to_typed(compose_config([*overrides, *tiny_overrides(data, tmp_path / "run")]))
    with pytest.raises(RuntimeError, match="no CUDA device. Set training.liger_kernel=false"):
        steps.build_model(cfg, tokenizer=None)  # fails before the tokenizer is used


def test_liger_not_installed_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel raises ImportError
    with pytest.raises(RuntimeError, match=r"liger-kernel is not importable .*pip install -e '\.\[liger\]'"):
        check_liger()


def test_liger_under_zero3_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("liger_kernel", "liger_kernel.transformers"):  # importable; nothing of it runs
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    check_liger(zero3=False)
    with pytest.raises(RuntimeError, match="with ZeRO-3: liger's fused cross-entropy reads lm_head.weight"):
        check_liger(zero3=True)


def chunked_reference(input, weight, target, reduction="mean", softcap=None, chunk=3):
    """liger_fused_linear_cross_entropy's contract in plain torch: logits of `chunk` rows at a time."""
    assert reduction == "sum"
    total = input.new_zeros((), dtype=torch.float32)
    for rows, targets in zip(input.split(chunk), target.split(chunk)):
        logits = (rows @ weight.T).float()  # [chunk, V]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        total = total + F.cross_entropy(logits, targets, reduction="sum")
    return total


@pytest.mark.parametrize("preset,softcap", [("tiny", None), ("tiny_gemma3", 0.5)])  # a cap that bites
def test_fused_loss_hook_gets_the_supervised_rows(preset, softcap):
    model = _model("pad", "flat", preset=preset).train()
    model.config.final_logit_softcapping = softcap
    samples = _samples(model, [1, 0])
    batch = DataCollator(0)(samples)
    loss, grads = _loss_and_grads(model, batch, _supervised(samples))
    model.fused_linear_cross_entropy = chunked_reference
    fused, fused_grads = _loss_and_grads(model, batch, _supervised(samples))
    torch.testing.assert_close(fused, loss, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
