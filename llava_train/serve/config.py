"""Hydra schemas of launch/chat.py and launch/serve.py (typed: a typo or a wrong type fails at start)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING


@dataclass
class LoadConfig:
    """Which model to load, as launch/eval.py takes it."""

    model_dir: str = MISSING  # ours (a finetune / merged run dir) or a transformers-native export
    template: str | None = None  # None: data.template of <model_dir>/config.yaml
    tokenizer: str | None = None  # None: the tokenizer saved in model_dir
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu


@dataclass
class ChatConfig(LoadConfig):
    image: str | None = None  # the image to talk about (`/image PATH` switches it)
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy


@dataclass
class ServeConfig(LoadConfig):
    host: str = "127.0.0.1"  # loopback only unless told otherwise
    port: int = 8000
    model_name: str | None = None  # the id of /v1/models; None: the model directory's name
    max_batch_size: int = 16
    batch_window_ms: float = 10.0  # how long a request waits for others to share its batch
    max_tokens: int = 256  # per request (also the default)
    max_images: int = 4  # per request
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 16_000_000


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore as "llava_chat" and "llava_serve"."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="llava_chat", node=ChatConfig)
    ConfigStore.instance().store(name="llava_serve", node=ServeConfig)
