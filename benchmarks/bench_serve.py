"""Serving throughput: requests/s at 1, 4 and 16 concurrent clients, batched against one-at-a-time.

    .venv/bin/python benchmarks/bench_serve.py [--model-dir runs/demo/hf --template vicuna_v1]
        [--concurrency 1,4,16] [--requests-per-client 2] [--max-tokens 16] [--threads 1] [--window-ms 10]

One server runs in this process on a loopback port; its engine batches (max_batch_size 16, a 10 ms
window as launch/serve.py's default) or, switched to max_batch_size 1, serves one request at a time. Each client thread sends its
requests back to back (non-streaming, greedy, one image each) with the official openai client; each
(clients, mode) is measured ``rounds`` times, interleaved, at least 4 requests a time, and the median
is reported. The ratio is each median over one-at-a-time with 1 client, measured in the same run. One intra-op thread by default, as the other CPU benchmarks (on this shared 2-core VM two
threads were 2-4x slower per request). Without --model-dir a tiny random model is built (smollm2 tokenizer, chatml); it rarely emits
an end-of-turn token, so every reply is max_tokens long, the same work for both servers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from common import machine, table, write  # noqa: I001  (benchmarks/ on sys.path, as for the others)


def _model_dir(tmp: Path) -> Path:
    import torch

    from llava_train.data import load_tokenizer
    from llava_train.model import ModelConfig, build_model

    tokenizer = load_tokenizer("smollm2")
    torch.manual_seed(0)
    out = tmp / "model"
    build_model(ModelConfig(preset="tiny"), tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "config.yaml").write_text("data:\n  template: chatml\n")
    return out


def _messages(i: int) -> list:
    import base64
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (56, 56 * (1 + i % 3), 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    question = ["What digit is this?", "Is it odd?", "How many digits are there?"][i % 3]
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


def _clients(url: str, concurrency: int, per_client: int, max_tokens: int, model: str) -> float:
    """Requests/s of ``concurrency`` threads each sending ``per_client`` requests back to back."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    failures: list[BaseException] = []

    def run(c: int) -> None:
        try:
            for k in range(per_client):
                client.chat.completions.create(
                    model=model, messages=_messages(c * per_client + k), max_tokens=max_tokens, temperature=0
                )
        except BaseException as err:  # reported after the join
            failures.append(err)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed: {failures[0]!r}")
    return concurrency * per_client / seconds


def _measure(generator, concurrency, per_client, max_tokens, rounds, window_s) -> tuple[dict, dict]:
    """{(mode, clients): [req/s per round]} and {(mode, clients): generations in the last round}."""
    from llava_train.serve.app import BackgroundServer, create_app
    from llava_train.serve.engine import BatchEngine
    from llava_train.serve.schema import Limits

    engine = BatchEngine(generator, max_batch_size=max(concurrency), window_s=window_s)
    rps: dict[tuple[str, int], list[float]] = {}
    generations: dict[tuple[str, int], int] = {}
    with BackgroundServer(create_app(engine, "bench", Limits(max_tokens=max_tokens))) as server:
        _clients(server.url, 1, 1, max_tokens, "bench")  # warm-up
        for _ in range(rounds):  # interleaved: each round measures every (clients, mode) once
            for c in concurrency:
                for mode, batch in MODES.items():
                    engine.max_batch_size = batch or max(concurrency)  # read when the worker gathers a batch
                    before = engine.stats()["batches"]
                    rps.setdefault((mode, c), []).append(
                        _clients(server.url, c, per_client[c], max_tokens, "bench")
                    )
                    generations[(mode, c)] = engine.stats()["batches"] - before
    return rps, generations


MODES = {"one-at-a-time": 1, "batched": None}  # None: as many as the most clients


def main(
    model_dir: str | None = None,
    template: str | None = None,
    concurrency: tuple[int, ...] = (1, 4, 16),
    requests_per_client: int = 2,
    max_tokens: int = 16,
    threads: int = 1,
    rounds: int = 2,
    min_requests: int = 4,
    window_ms: float = 10.0,
) -> dict:
    import torch

    from llava_train.serve.generator import load_generator

    per_client = {c: max(requests_per_client, -(-min_requests // c)) for c in concurrency}
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            generator = load_generator(str(model_dir or _model_dir(Path(tmp))), template)
        rps, generations = _measure(generator, concurrency, per_client, max_tokens, rounds, window_ms / 1000)
    finally:
        torch.set_num_threads(old_threads)
    baseline = statistics.median(rps[("one-at-a-time", concurrency[0])])
    rows = []
    for mode in MODES:
        for c in concurrency:
            n, med = c * per_client[c], statistics.median(rps[(mode, c)])
            rows.append(dict(mode=mode, clients=c, requests=n, req_per_s=round(med, 3),
                             ratio=round(med / baseline, 2), runs=len(rps[(mode, c)]),
                             mean_batch=round(n / generations[(mode, c)], 2)))  # fmt: skip
    print(table(rows, ["mode", "clients", "requests", "req_per_s", "ratio", "runs", "mean_batch"]))
    payload = dict(
        model_dir=str(model_dir or "tiny random (smollm2, chatml)"),
        max_tokens=max_tokens,
        threads=threads,
        rounds=rounds,
        window_ms=window_ms,
        results=rows,
        meta_at_end=machine(),
    )
    write("serve", payload)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--template", default=None)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--window-ms", type=float, default=10.0, help="the batching window (serve's default: 10)"
    )
    args = parser.parse_args()
    main(
        args.model_dir,
        args.template,
        tuple(int(c) for c in args.concurrency.split(",")),
        args.requests_per_client,
        args.max_tokens,
        args.threads,
        args.rounds,
        window_ms=args.window_ms,
    )
