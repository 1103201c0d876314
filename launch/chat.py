"""Chat with a trained model in the terminal; the reply streams as it is generated.

    python launch/chat.py model_dir=runs/demo/hf template=chatml image=data/demo/images/x.png
    python launch/chat.py model_dir=runs/finetune image=photo.jpg temperature=0.7

In the chat: /image PATH (a new conversation about another image), /reset, /quit. Keys are the fields
of llava_train.serve.config.ChatConfig (Hydra syntax, typed).
"""

import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from llava_train.config import CONF_DIR, tool_argv
from llava_train.serve.chat import ChatSession, run_terminal_chat
from llava_train.serve.config import ChatConfig, register_configs
from llava_train.serve.generator import load_generator

log = logging.getLogger("launch.chat")


@hydra.main(config_path=str(CONF_DIR), config_name="llava_chat", version_base="1.3")
def main(raw: DictConfig) -> None:
    cfg: ChatConfig = OmegaConf.to_object(raw)  # 1. typed config (MISSING keys fail here)
    log.info("1/3 loading %s", cfg.model_dir)
    generator = load_generator(cfg.model_dir, cfg.template, cfg.tokenizer, cfg.dtype, cfg.device)  # 2. model
    log.info("2/3 template %s, image %s", generator.template.name, cfg.image)
    session = ChatSession(generator, cfg.image, cfg.max_tokens, cfg.temperature)  # 3. talk
    run_terminal_chat(session)


if __name__ == "__main__":
    register_configs()
    sys.argv = tool_argv(sys.argv)  # no Hydra run folder or log file
    main()
