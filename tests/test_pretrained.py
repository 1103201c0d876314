"""SmolLM2-135M-Instruct and Gemma 3 270M: GGUF -> cached safetensors checkpoint (fast cache logic, slow real
conversions)."""

import hashlib
import json

import pytest

from llava_train import pretrained
from llava_train.pretrained import (
    assemble_parts,
    gemma3_270m_checkpoint,
    gemma3_gguf_parts,
    smollm2_135m_checkpoint,
    smollm2_gguf_path,
)


def _fake_convert(gguf_path, out_dir):
    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text("{}")
    (out_dir / pretrained._MARKER).write_text(json.dumps({"source": gguf_path.name}))


def test_gguf_is_found_in_the_asset_wheel():
    assert smollm2_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_converts_once_atomically_then_reuses(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        pretrained, "convert_smollm2_gguf", lambda g, o: calls.append(o) or _fake_convert(g, o)
    )
    path = smollm2_135m_checkpoint(tmp_path)
    assert path == tmp_path / "smollm2-135m-instruct" and (path / "config.json").is_file()
    assert calls[0].parent == tmp_path and calls[0].name.startswith(".smollm2-135m-instruct.tmp-")
    assert smollm2_135m_checkpoint(tmp_path) == path and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # no tmp left


def test_env_var_sets_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrained, "convert_smollm2_gguf", _fake_convert)
    assert smollm2_135m_checkpoint() == tmp_path / "smollm2-135m-instruct"


def test_incomplete_dir_fails_and_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "smollm2-135m-instruct").mkdir()
    with pytest.raises(FileExistsError, match="delete it"):
        smollm2_135m_checkpoint(tmp_path)

    def broken(gguf_path, out_dir):
        out_dir.mkdir()
        raise RuntimeError("disk full")

    other = tmp_path / "other"
    monkeypatch.setattr(pretrained, "convert_smollm2_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2_135m_checkpoint(other)
    assert list(other.iterdir()) == []


def test_concurrent_winner_is_kept(tmp_path):
    target, tmp = tmp_path / "t", tmp_path / "tmp"
    _fake_convert(smollm2_gguf_path(), target)
    _fake_convert(smollm2_gguf_path(), tmp)
    pretrained._publish(tmp, target)  # rename fails (target not empty): the existing one is used
    assert (target / pretrained._MARKER).is_file()


@pytest.mark.slow
def test_real_conversion_matches_gguf_and_answers_sensibly(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_135m_checkpoint(tmp_path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    gguf = smollm2_gguf_path()
    reference = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply, reply
    assert out[0, -1].item() == tokenizer.eos_token_id or len(reply.split()) >= 3


def test_gemma3_chunks_are_found_in_their_wheels():
    parts = gemma3_gguf_parts()
    assert [p.name for p in parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)]
    assert sum(p.stat().st_size for p in parts) == pretrained.GEMMA3_GGUF_BYTES


def test_assembly_checks_size_and_hash(tmp_path):
    parts = []
    for i, data in enumerate([b"GGUF", b"\x03\x00", b"rest"]):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(data)
    whole = b"GGUF\x03\x00rest"
    sha = hashlib.sha256(whole).hexdigest()
    out = assemble_parts(parts, tmp_path / "whole.gguf", len(whole), sha)
    assert out.read_bytes() == whole
    with pytest.raises(ValueError, match="force-reinstall"):  # a chunk out of order
        assemble_parts(parts[::-1], tmp_path / "bad.gguf", len(whole), sha)
    assert not (tmp_path / "bad.gguf").exists()
    with pytest.raises(ValueError, match=f"expected {len(whole) + 1} bytes"):
        assemble_parts(parts, tmp_path / "short.gguf", len(whole) + 1, sha)


def test_gemma3_conversion_is_cached_like_smollm2(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        pretrained, "convert_gemma3_gguf", lambda parts, o: calls.append(parts) or _fake_convert(parts[0], o)
    )
    path = gemma3_270m_checkpoint(tmp_path)
    assert path == tmp_path / "gemma-3-270m" and (path / pretrained._MARKER).is_file()
    assert gemma3_270m_checkpoint(tmp_path) == path and len(calls) == 1 and len(calls[0]) == 4


@pytest.mark.slow
def test_gemma3_conversion_matches_gguf_and_continues_sensibly(tmp_path):
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM

    path = gemma3_270m_checkpoint(tmp_path / "cache")
    marker = json.loads((path / pretrained._MARKER).read_text())
    assert marker["sha256"] == pretrained.GEMMA3_GGUF_SHA256 and marker["source"] == pretrained.GEMMA3_GGUF
    assert not list((tmp_path / "cache").glob("*.gguf"))  # the assembled GGUF is not kept
    model = Gemma3ForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (model.config.num_hidden_layers, model.config.hidden_size, len(tokenizer)) == (18, 640, 262144)
    gguf = assemble_parts(
        gemma3_gguf_parts(),
        tmp_path / "ref.gguf",
        pretrained.GEMMA3_GGUF_BYTES,
        pretrained.GEMMA3_GGUF_SHA256,
    )
    reference = Gemma3ForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name).eval()
    ids = tokenizer(
        "The capital of France is Paris. The capital of Germany is", return_tensors="pt"
    ).input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert reply.split()[0].strip(".,") == "Berlin", reply
