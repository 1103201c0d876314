"""The OpenAI-compatible server, driven by the official `openai` client on a loopback port.

Answers equal run_eval's (launch/eval.py's library) for the same questions; streaming gives the same
text; concurrent requests are generated in one batch; bad requests get a 4xx with OpenAI's error body
and the server keeps serving.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from test_serve_utils import MAX_TOKENS, QUESTIONS, image_message, make_images, make_model_dir, running_server

from llava_train.eval.questions import read_jsonl, write_jsonl
from llava_train.eval.run import run_eval
from llava_train.serve.generator import Conversation, PromptError

REPO = Path(__file__).resolve().parent.parent
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = make_model_dir(root)
    images = make_images(root / "images")
    with running_server(model_dir, max_batch_size=8, window_s=0.05) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield dict(root=root, model_dir=model_dir, images=images, server=server, client=client)


def _ask(client, messages, **kwargs):
    return client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0, **kwargs
    )


def test_answers_equal_eval_for_the_same_questions(setup):
    root, images = setup["root"], setup["images"]
    questions = [
        {"question_id": i, "image": p.name, "text": q} for i, (p, q) in enumerate(zip(images, QUESTIONS))
    ]
    questions.append({"question_id": 3, "text": "A text-only question."})
    write_jsonl(questions, root / "questions.jsonl")
    run_eval(
        str(setup["model_dir"]),
        str(root / "questions.jsonl"),
        str(root / "images"),
        str(root / "answers.jsonl"),
        batch_size=4,
        max_new_tokens=MAX_TOKENS,
    )
    expected = [a["text"] for a in read_jsonl(root / "answers.jsonl")]
    got = []
    for q in questions:
        msg = (
            image_message(root / "images" / q["image"], q["text"])
            if "image" in q
            else {"role": "user", "content": q["text"]}
        )
        resp = _ask(setup["client"], [msg])
        assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
        assert resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
        assert 0 < resp.usage.completion_tokens <= MAX_TOKENS + 1
        got.append(resp.choices[0].message.content)
    assert got == expected
    assert all(expected)  # a random model still says something


def test_stream_gives_the_same_text_in_openai_chunks(setup):
    client, images = setup["client"], setup["images"]
    messages = [
        image_message(images[0], QUESTIONS[0]),
        {"role": "assistant", "content": "seven"},
        {"role": "user", "content": "And is it odd?"},
    ]
    full = _ask(client, messages).choices[0].message.content
    chunks = list(_ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert len({c.id for c in chunks}) == 1
    # The raw wire format: `data: {...}` events, `chat.completion.chunk` objects, `data: [DONE]` last.
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.stream("POST", setup["server"].url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "chat.completion.chunk" for e in events[:-1])


def test_concurrent_requests_are_generated_in_one_batch(setup):
    client, images, engine = setup["client"], setup["images"], setup["server"].engine
    requests = [[image_message(images[i % 3], QUESTIONS[i % 3] + " " * (i // 3))] for i in range(6)]
    alone = [_ask(client, m).choices[0].message.content for m in requests]
    before = engine.stats()["batch_sizes"]
    answers = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def one(i):
        barrier.wait()
        answers[i] = _ask(client, requests[i]).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = engine.stats()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == len(requests)
    assert max(new) > 1, new  # several requests shared one generation
    assert answers == alone  # and batching did not change a greedy answer


def _png(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _image_msg(url: str) -> list:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What?"}],
        }
    ]


BAD_REQUESTS = {
    "no messages key": ({"model": "tiny"}, "messages"),
    "empty messages": ({"messages": []}, "messages"),
    "remote image url": ({"messages": _image_msg("http://127.0.0.1:1/x.png")}, "image_url_not_supported"),
    "https image url": ({"messages": _image_msg("https://example.com/x.png")}, "image_url_not_supported"),
    "not base64": ({"messages": _image_msg("data:image/png;base64,@@@notbase64@@@")}, "invalid_image"),
    "not an image": (
        {"messages": _image_msg("data:image/png;base64," + base64.b64encode(b"hello").decode())},
        "invalid_image",
    ),
    "oversized image bytes": (
        {"messages": _image_msg("data:image/png;base64," + "A" * 400_000)},
        "image_too_large",
    ),
    "too many pixels": (
        {"messages": _image_msg("data:image/png;base64," + _png((1200, 1000)))},
        "image_too_large",
    ),
    "not a data url": ({"messages": _image_msg("data:text/plain;base64,aGk=")}, "invalid_image_url"),
    "max_tokens too large": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000},
        "max_tokens",
    ),
    "max_tokens zero": ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    "prompt too long": (
        {"messages": [{"role": "user", "content": "word " * 2100}]},
        "context_length_exceeded",
    ),
    "wrong type messages": ({"messages": "hi"}, "messages"),
    "wrong type max_tokens": (
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
        "max_tokens",
    ),
    "wrong type temperature": (
        {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
        "temperature",
    ),
    "temperature out of range": (
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 5.0},
        "temperature",
    ),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    "unknown part type": (
        {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
        "content",
    ),
    "last message not user": (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "messages",
    ),
    "roles out of order": ({"messages": [{"role": "assistant", "content": "b"}]}, "messages[0]"),
    "image tag in text": ({"messages": [{"role": "user", "content": "<image> hi"}]}, "messages[0].content"),
    "too many images": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png()}}
                    ]
                    * 5,
                }
            ]
        },
        "messages",
    ),
    "n > 1": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_gets_a_4xx_with_an_openai_error_body(setup, case):
    body, expected = BAD_REQUESTS[case]
    r = httpx.post(setup["server"].url + "/v1/chat/completions", json=body, timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert expected in f"{error['param']} {error['code']}", error


def test_without_max_tokens_the_reply_fits_what_the_context_leaves(setup):
    generator = setup["server"].engine.generator
    conversation = Conversation([("user", "word " * 2000)])
    item = generator.prepare(conversation, 256, fit=True)
    assert item.max_tokens == generator.context_length - item.prompt_tokens < 256
    with pytest.raises(PromptError, match="more than the model's context"):
        generator.prepare(conversation, 256)


def test_malformed_json_and_unknown_model_and_path(setup):
    url = setup["server"].url
    r = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"messages": [',
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(
        url + "/v1/chat/completions", json={"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="never fetches URLs"):
        _ask(setup["client"], _image_msg("http://127.0.0.1:1/x.png"))


def test_server_keeps_serving_after_bad_requests(setup):
    for case in ("remote image url", "not an image", "prompt too long", "wrong type messages"):
        body = BAD_REQUESTS[case][0]
        httpx.post(setup["server"].url + "/v1/chat/completions", json=body, timeout=60)
    resp = _ask(setup["client"], [{"role": "user", "content": "still there?"}])
    assert resp.choices[0].message.content
    health = httpx.get(setup["server"].url + "/health").json()
    assert health["status"] == "ok" and health["engine"]["queued"] == 0


def test_models_and_health(setup):
    models = setup["client"].models.list()
    assert [m.id for m in models.data] == ["tiny"]
    health = httpx.get(setup["server"].url + "/health").json()
    assert health["model"] == "tiny" and health["engine"]["batches"] >= 0
    assert setup["server"].host == "127.0.0.1"


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: 20-60 s on the 2-core VM
def test_launch_serve_cli_binds_loopback_and_answers(setup):
    """The real entry point: launch/serve.py in a subprocess, on 127.0.0.1 (the default host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        str(REPO / "launch" / "serve.py"),
        f"model_dir={setup['model_dir']}",
        f"port={port}",
        "max_tokens=4",
    ]
    proc = subprocess.Popen(
        cmd, cwd=setup["root"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "launch/serve.py did not come up"
                time.sleep(0.5)
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
        )
        assert [m.id for m in client.models.list().data] == ["model"]  # the model directory's name
        resp = client.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}])
        assert resp.usage.completion_tokens <= 5 and resp.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
