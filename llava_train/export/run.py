"""The export operations behind launch/export.py, driven by one typed config (Hydra structured config).

    merge           base (model dir) + adapter_dir (finetune_lora checkpoint) -> a full model dir (ours)
    merge_pretrain  base (model dir) + adapter_dir (pretrain run: projector [+ tower]) -> a full model dir
    hf         model_dir (ours) + tokenizer -> a transformers-native Llava / LlavaNext dir
    import_hf  model_dir (transformers-native) -> a model dir of ours

Every input is named explicitly; nothing is inferred from folder names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from omegaconf import MISSING

logger = logging.getLogger(__name__)


class ExportOp(str, Enum):
    merge = "merge"
    merge_pretrain = "merge_pretrain"
    hf = "hf"
    import_hf = "import_hf"


@dataclass
class ExportConfig:
    """Keys of ``python launch/export.py op=... key=value ...``."""

    op: ExportOp = MISSING
    out_dir: str = MISSING
    model_dir: str | None = None  # merge: the LoRA run's base model; hf / import_hf: the model to convert
    adapter_dir: str | None = (
        None  # merge: the finetune_lora checkpoint dir; merge_pretrain: the pretrain run
    )
    tokenizer: str | None = None  # merge / hf: "mistral", "smollm2" or a tokenizer dir (saved with the model)
    dtype: str = "float32"
    template: str | None = None  # hf: the chat template's conversation template (None: data.template of
    # <model_dir>/config.yaml; without either the export has no chat template)
    # hf: export a model with mm_unpad_rounding=floor (the original's) though the native classes round
    accept_native_rounding: bool = False


def register_export_config(name: str = "llava_export") -> None:
    """Register ``ExportConfig`` with Hydra's ConfigStore (called by the entry point, not at import)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=name, node=ExportConfig)


def _need(cfg: ExportConfig, *keys: str) -> None:
    from llava_train.model.builder import parse_dtype

    missing = [k for k in keys if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"op={cfg.op.value} needs {', '.join(k + '=...' for k in missing)}")
    parse_dtype(cfg.dtype)  # fail before anything is loaded


def _run_template(model_dir: str) -> str | None:
    """``data.template`` of the training run's config.yaml next to the model, if there is one."""
    run_config = Path(model_dir) / "config.yaml"
    if not run_config.is_file():
        return None
    from omegaconf import OmegaConf

    found = OmegaConf.select(OmegaConf.load(run_config), "data.template")
    return str(found) if found else None


def run_export(cfg: ExportConfig) -> Path:
    """Run ``cfg.op``; returns the output directory."""
    from llava_train.data import load_tokenizer
    from llava_train.export import export_hf, import_hf, load_original, merge_lora, merge_pretrain
    from llava_train.model.builder import parse_dtype

    op, out, dtype = ExportOp(cfg.op), Path(cfg.out_dir), parse_dtype(cfg.dtype)
    if op in (ExportOp.merge, ExportOp.merge_pretrain):
        _need(cfg, "model_dir", "adapter_dir")
        merge = merge_lora if op == ExportOp.merge else merge_pretrain
        merge(cfg.model_dir, cfg.adapter_dir, dtype=dtype).save_pretrained(out)
        if cfg.tokenizer is not None:
            load_tokenizer(cfg.tokenizer).save_pretrained(out)
    elif op == ExportOp.hf:
        _need(cfg, "model_dir", "tokenizer")
        model, template = (
            load_original(cfg.model_dir, dtype=dtype),
            cfg.template or _run_template(cfg.model_dir),
        )
        if template is None:
            logger.warning(
                "no template= and no data.template in %s/config.yaml: no chat template", cfg.model_dir
            )
        export_hf(
            model,
            load_tokenizer(cfg.tokenizer),
            out,
            template=template,
            accept_native_rounding=cfg.accept_native_rounding,
        )
    else:
        _need(cfg, "model_dir")
        import_hf(cfg.model_dir, dtype=dtype).save_pretrained(out)
    logger.info("%s -> %s", op.value, out)
    return out
