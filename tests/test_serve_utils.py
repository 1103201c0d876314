"""Shared set-up of the serve / chat tests: a saved tiny model dir, images, data URLs, a running server."""

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_train.data import load_tokenizer
from llava_train.model import ModelConfig, build_model

IMAGE_SIZES = [(40, 30), (56, 56), (30, 60)]
QUESTIONS = ["What digit is this?", "Is it odd?", "How many digits are there?"]
MAX_TOKENS = 6


def make_model_dir(root: Path, **model_kwargs) -> Path:
    """A tiny random model saved as training saves one: weights, tokenizer, the run's config.yaml (chatml)."""
    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", **model_kwargs), tokenizer)
    out = root / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "config.yaml").write_text("data:\n  template: chatml\n")
    return out


def make_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(IMAGE_SIZES):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_message(path: Path, text: str) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(path)}},
            {"type": "text", "text": text},
        ],
    }


@contextlib.contextmanager
def running_server(model_dir: Path, name: str = "tiny", **engine_kwargs) -> Iterator[object]:
    """The app on a free loopback port (uvicorn in a thread), its engine batching; yields the server."""
    from llava_train.serve.app import BackgroundServer, create_app
    from llava_train.serve.engine import BatchEngine
    from llava_train.serve.generator import load_generator
    from llava_train.serve.schema import Limits

    limits = engine_kwargs.pop(
        "limits", Limits(max_tokens=MAX_TOKENS, max_image_bytes=200_000, max_image_pixels=1_000_000)
    )
    engine = BatchEngine(load_generator(str(model_dir)), **engine_kwargs)
    with BackgroundServer(create_app(engine, name, limits)) as server:
        server.engine = engine
        yield server
