"""Export a LLaVA model: merge a LoRA run, convert to / from transformers' native llava format.

    python launch/export.py op=merge model_dir=runs/base adapter_dir=runs/lora/checkpoint-500 \
        tokenizer=mistral out_dir=out/merged
    python launch/export.py op=hf model_dir=out/merged tokenizer=mistral out_dir=out/llava-hf
    python launch/export.py op=import_hf model_dir=out/llava-hf out_dir=out/ours

Keys are the fields of llava_train.export.run.ExportConfig (Hydra syntax, typed: a typo fails at start).
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from llava_train.config import tool_argv
from llava_train.export.run import ExportConfig, register_export_config, run_export

log = logging.getLogger("launch.export")


@hydra.main(config_path=None, config_name="llava_export", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg: ExportConfig = OmegaConf.to_object(raw)  # 1. typed config (MISSING keys fail here)
    log.info("1/2 %s from %s", cfg.op.value, cfg.model_dir)
    out = run_export(cfg)  # 2. load, convert, save
    log.info("2/2 wrote %s", out)


if __name__ == "__main__":
    register_export_config()
    sys.argv = tool_argv(sys.argv)  # no Hydra run folder or log file: the given paths are the outputs
    main()
