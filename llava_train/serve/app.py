"""The OpenAI-compatible HTTP app (FastAPI): chat completions, models, health, and the web page at ``/``.

Requests are validated in the request handler, then queued to the :class:`BatchEngine`; its worker
thread hands each request's text back through an asyncio queue (``loop.call_soon_threadsafe``), so the
event loop never waits on the model. Every refusal, including malformed JSON and wrong types, is a
4xx with OpenAI's error body. ``BackgroundServer`` runs the app with uvicorn in a thread (tests,
benchmarks); ``launch/serve.py`` runs it in the foreground.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_train.serve.engine import BatchEngine, Job
from llava_train.serve.generator import PromptError, Reply
from llava_train.serve.schema import (
    APIError,
    ChatCompletionRequest,
    Limits,
    chunk_body,
    completion_body,
    completion_id,
    parse_request,
    usage,
)

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(engine: BatchEngine, model_name: str, limits: Limits | None = None) -> FastAPI:
    """The app around ``engine``; the engine's worker starts and stops with the app (lifespan)."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llava-train", lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    background = engine.generator.background

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "engine": engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llava-train"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        if req.model is not None and req.model != model_name:
            raise APIError(
                f"model {req.model!r} is not served here; GET /v1/models lists {model_name!r}",
                "model",
                "model_not_found",
                status=404,
            )
        conversation, max_tokens, params = parse_request(req, limits, background)
        try:
            # No max_tokens: the limit, or what the context leaves after the prompt.
            fit = max_tokens is None
            item = engine.generator.prepare(conversation, limits.max_tokens if fit else max_tokens, fit)
        except PromptError as err:
            raise APIError(str(err), "messages", err.code) from err
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = engine.submit(item, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        cid = completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _sse(job, events, cid, model_name, include_usage), media_type="text/event-stream"
            )
        try:
            reply = await _reply(events)
        except asyncio.CancelledError:  # the client went away
            job.cancel()
            raise
        return completion_body(
            cid,
            model_name,
            reply.text,
            reply.finish_reason,
            usage(item.prompt_tokens, reply.completion_tokens),
        )

    return app


async def _reply(events: asyncio.Queue) -> Reply:
    """The finished reply of a non-streamed request (its text pieces are for streaming only)."""
    while True:
        kind, value = await events.get()
        if kind == "error":
            raise APIError(f"generation failed: {value}", status=500, type="server_error")
        if kind == "done":
            return value


async def _sse(
    job: Job, events: asyncio.Queue, cid: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format: role, text pieces, finish, [usage], ``[DONE]``."""

    def event(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield event(chunk_body(cid, model, {"role": "assistant", "content": ""}))
        while True:
            kind, value = await events.get()
            if kind == "text":
                yield event(chunk_body(cid, model, {"content": value}))
            elif kind == "error":
                err = APIError(f"generation failed: {value}", status=500, type="server_error")
                yield event(err.body())
                break
            else:
                yield event(chunk_body(cid, model, {}, value.finish_reason))
                if include_usage:
                    yield event(
                        chunk_body(
                            cid, model, {}, usage_=usage(job.item.prompt_tokens, value.completion_tokens)
                        )
                    )
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or the stream ended): free the row
        job.cancel()


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message, param = f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}", None
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
            param = ".".join(loc) or None
        return JSONResponse(APIError(message, param, first.get("type")).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            APIError(str(err.detail), type=kind, status=err.status_code).body(), status_code=err.status_code
        )


class BackgroundServer:
    """uvicorn serving ``app`` in a thread on a loopback port it binds itself (0: a free one)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
