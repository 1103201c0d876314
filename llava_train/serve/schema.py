"""OpenAI chat-completions request / response shapes, and turning a request into a Conversation.

Requests are validated strictly (pydantic, strict types; unknown fields ignored as OpenAI's clients
send optional ones). Images come inline only, as ``data:image/png|jpeg|webp;base64,...`` URLs; a
remote URL is refused, never fetched. Every refusal is an :class:`APIError`, which the app answers
with a 4xx and OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data.errors import BadRecordError
from llava_train.data.image import load_image
from llava_train.serve.generator import Conversation, SamplingParams

_DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp);base64,(.*)", re.DOTALL)


class APIError(Exception):
    """A request the server refuses: HTTP ``status`` and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    messages: list[Message]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 256  # also the default when a request gives none
    max_images: int = 4
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 16_000_000


def parse_request(
    req: ChatCompletionRequest, limits: Limits, background: tuple[int, int, int]
) -> tuple[Conversation, int | None, SamplingParams]:
    """(conversation, max_tokens or None when not given, sampling); APIError naming the field on anything wrong."""
    if req.n != 1:
        raise APIError(f"n={req.n}: this server returns one choice per request; use n=1", "n")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(f"max_tokens must be in [1, {limits.max_tokens}], got {max_tokens}", "max_tokens")
    if not req.messages:
        raise APIError("messages is empty: send at least one user message", "messages")
    system, turns, images = None, [], []
    for i, msg in enumerate(req.messages):
        where = f"messages[{i}]"
        if msg.role in ("system", "developer"):
            if turns:
                raise APIError(f"{where}: a {msg.role} message must come before the conversation", where)
            system = (system + "\n" if system else "") + _text_only(msg, where)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if msg.role != expected:
            raise APIError(f"{where} is {msg.role}, expected {expected}: roles must alternate", where)
        if msg.role == "assistant":
            turns.append(("assistant", _text_only(msg, where)))
            continue
        text, found = _user_content(msg, where, limits, background)
        images += found
        turns.append(("user", text))
    if not turns or turns[-1][0] != "user":
        raise APIError("the last message must be the user's (the one to answer)", "messages")
    if len(images) > limits.max_images:
        raise APIError(f"{len(images)} images; at most {limits.max_images} per request", "messages")
    return Conversation(turns, images, system), max_tokens, SamplingParams(req.temperature, req.top_p)


def _text_only(msg: Message, where: str) -> str:
    if msg.content is None:
        raise APIError(f"{where} has no content", f"{where}.content")
    if isinstance(msg.content, str):
        return _check_text(msg.content, where)
    if any(isinstance(p, ImagePart) for p in msg.content):
        raise APIError(f"{where}: only user messages may hold images", f"{where}.content")
    return _check_text("\n".join(p.text for p in msg.content), where)


def _check_text(text: str, where: str) -> str:
    if DEFAULT_IMAGE_TOKEN in text:
        raise APIError(
            f"{where}: the text holds {DEFAULT_IMAGE_TOKEN!r}; send images as image_url parts instead",
            f"{where}.content",
        )
    return text


def _user_content(
    msg: Message, where: str, limits: Limits, background: tuple[int, int, int]
) -> tuple[str, list[Any]]:
    """The user text with one ``<image>`` tag per image part (the template puts them first), and the images."""
    if msg.content is None or isinstance(msg.content, str):
        return _text_only(msg, where), []
    texts, images = [], []
    for j, part in enumerate(msg.content):
        if isinstance(part, TextPart):
            texts.append(_check_text(part.text, where))
        else:
            images.append(
                decode_image_url(
                    part.image_url.url, f"{where}.content[{j}].image_url.url", limits, background
                )
            )
    return DEFAULT_IMAGE_TOKEN * len(images) + "\n".join(texts), images


def decode_image_url(url: str, param: str, limits: Limits, background: tuple[int, int, int]) -> Any:
    """RGB PIL image of a base64 data URL; refuses remote URLs (never fetched), bad or oversized data."""
    if not url.startswith("data:"):
        raise APIError(
            f"{param}: only inline images are accepted (data:image/png;base64,...); this server never "
            "fetches URLs",
            param,
            "image_url_not_supported",
        )
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise APIError(
            f"{param}: expected data:image/png|jpeg|webp;base64,<data>", param, "invalid_image_url"
        )
    data = match.group(2)
    if len(data) * 3 // 4 > limits.max_image_bytes:
        raise APIError(
            f"{param}: the image is over {limits.max_image_bytes} bytes; send a smaller one",
            param,
            "image_too_large",
        )
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise APIError(f"{param}: the base64 data does not decode ({err})", param, "invalid_image") from err
    try:
        return load_image(raw, max_pixels=limits.max_image_pixels, background=background)
    except BadRecordError as err:
        code = "image_too_large" if err.kind == "image_too_large" else "invalid_image"
        raise APIError(f"{param}: {err}", param, code) from err


# ---- responses ----
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(cid: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_,
    }


def chunk_body(
    cid: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None
) -> dict:
    """One ``chat.completion.chunk``; the usage-only chunk (``stream_options.include_usage``) has no choices."""
    choices = (
        []
        if usage_ is not None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body
