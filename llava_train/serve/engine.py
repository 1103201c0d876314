"""Request batching: one worker thread gathers the requests that arrive together and generates them at once.

A request waits at most ``window_s`` for company (or until ``max_batch_size`` are waiting); requests
queued while a batch runs form the next one. Rows with different sampling settings go in separate
generations. Each request's text pieces and its end are handed to its own ``emit`` callback, from the
worker thread: the server turns them into asyncio queue items, a test can collect them in a list.
The model is only ever used by the worker thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llava_train.serve.generator import Generator, Prepared, Reply, RowDecoder, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in the engine. ``emit`` gets ("text", str) pieces, then ("done", Reply) or ("error", exc)."""

    item: Prepared
    params: SamplingParams
    emit: Callable[[tuple[str, Any]], None]
    row: RowDecoder | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Stop generating for this request (its client went away); the rest of its batch goes on."""
        self.cancelled = True
        if self.row is not None:
            self.row.cancelled = True


class BatchEngine:
    """Background batched generation over a :class:`Generator`; ``start`` / ``stop`` the worker."""

    def __init__(self, generator: Generator, max_batch_size: int = 16, window_s: float = 0.01):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.generator, self.max_batch_size, self.window_s = generator, max_batch_size, window_s
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._batch_sizes: Counter[int] = Counter()

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="llava-batch-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, item: Prepared, params: SamplingParams, emit: Callable[[tuple[str, Any]], None]) -> Job:
        if self._thread is None:
            raise RuntimeError("BatchEngine.start() was not called")
        job = Job(item, params, emit)
        self._queue.put(job)
        return job

    def stats(self) -> dict:
        """How many generations ran at each batch size, e.g. {"batch_sizes": {"1": 3, "4": 2}, ...}."""
        with self._lock:
            sizes = dict(sorted(self._batch_sizes.items()))
        return {
            "batch_sizes": {str(k): v for k, v in sizes.items()},
            "batches": sum(sizes.values()),
            "max_batch_size_seen": max(sizes, default=0),
            "queued": self._queue.qsize(),
        }

    # ---- worker ----
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = self._gather(first)
            for group in _by_params(jobs, self.max_batch_size):
                self._run(group)

    def _gather(self, first: Job) -> list[Job]:
        """``first`` plus whatever arrives within the window (and is already queued), up to the batch size."""
        jobs, deadline = [first], time.monotonic() + self.window_s
        while len(jobs) < self.max_batch_size:
            try:
                jobs.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return jobs

    def _run(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancelled]
        if not jobs:
            return
        rows = self.generator.row_decoders([j.item for j in jobs])
        for job, row in zip(jobs, rows):
            job.row = row
            row.cancelled = job.cancelled
        with self._lock:
            self._batch_sizes[len(jobs)] += 1
        try:
            replies: list[Reply] = self.generator.generate(
                [j.item for j in jobs], jobs[0].params, lambda i, text: jobs[i].emit(("text", text)), rows
            )
        except Exception as err:  # the server answers each request of the batch; the worker goes on
            logger.exception("generation of a batch of %d failed", len(jobs))
            for job in jobs:
                job.emit(("error", err))
            return
        for job, reply in zip(jobs, replies):
            job.emit(("done", reply))


def _by_params(jobs: list[Job], max_batch_size: int) -> list[list[Job]]:
    """Jobs grouped by sampling settings, in arrival order, each group at most ``max_batch_size``."""
    groups: dict[SamplingParams, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.params, []).append(job)
    return [g[i : i + max_batch_size] for g in groups.values() for i in range(0, len(g), max_batch_size)]
