"""Serve a trained model over an OpenAI-compatible HTTP API, with a web page at /.

    python launch/serve.py model_dir=runs/demo/hf template=chatml            # http://127.0.0.1:8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}'

Concurrent requests are generated in one batch (max_batch_size, batch_window_ms). Binds 127.0.0.1
unless host= says otherwise. Keys are the fields of llava_train.serve.config.ServeConfig.
"""

import logging
import sys
from pathlib import Path

import hydra
import uvicorn
from omegaconf import DictConfig, OmegaConf

from llava_train.config import CONF_DIR, tool_argv
from llava_train.serve.app import create_app
from llava_train.serve.config import ServeConfig, register_configs
from llava_train.serve.engine import BatchEngine
from llava_train.serve.generator import load_generator
from llava_train.serve.schema import Limits

log = logging.getLogger("launch.serve")


@hydra.main(config_path=str(CONF_DIR), config_name="llava_serve", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg: ServeConfig = OmegaConf.to_object(raw)  # 1. typed config (MISSING keys fail here)
    log.info("1/3 loading %s", cfg.model_dir)
    generator = load_generator(cfg.model_dir, cfg.template, cfg.tokenizer, cfg.dtype, cfg.device)  # 2. model
    engine = BatchEngine(generator, cfg.max_batch_size, cfg.batch_window_ms / 1000)  # 3. batching + app
    limits = Limits(cfg.max_tokens, cfg.max_images, cfg.max_image_bytes, cfg.max_image_pixels)
    app = create_app(engine, cfg.model_name or Path(cfg.model_dir).resolve().name, limits)
    log.info("3/3 serving on http://%s:%d (template %s)", cfg.host, cfg.port, generator.template.name)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")


if __name__ == "__main__":
    register_configs()
    sys.argv = tool_argv(sys.argv)  # no Hydra run folder or log file
    main()
