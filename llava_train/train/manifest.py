"""Content hashes of a checkpoint's files: recorded in its `COMPLETE` manifest at save, checked on resume.

Sizes (checkpoint.checkpoint_problems) catch a cut-short write and are free to check, so every checkpoint of
a run is sorted by them. A same-size corruption (bit flips, a file replaced by one of the same length) only
shows in the contents: the SHA-256 of every file is computed when the checkpoint is finalised, while its
files are still in the page cache (no disk read: the cost is the hashing alone, the same as hashing the bytes
as they are written), and checked again only for the one checkpoint a resume is about to load, whose files
that resume reads anyway. Files are hashed on a thread pool (hashlib releases the GIL on large buffers).

What it costs: benchmarks/bench_checkpoint_hash.py measures the rate; docs/RELIABILITY.md states it for a
7B checkpoint. A hash is no defence against someone who can also rewrite `COMPLETE` (plain JSON): that is the
job of safe_load.py, which never unpickles code.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HASH = "sha256"
_CHUNK = 8 << 20


def file_digest(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB chunks."""
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0))))


def content_manifest(ckpt_dir: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Relative path -> {"size", "sha256"} of every file under `ckpt_dir` whose name is not in `exclude`."""
    files = [p for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name not in exclude]
    with ThreadPoolExecutor(_workers()) as pool:
        digests = list(pool.map(file_digest, files))
    return {str(p.relative_to(ckpt_dir)): {"size": p.stat().st_size, HASH: d} for p, d in zip(files, digests)}


def entry_size(entry: int | dict) -> int:
    """The size of a manifest entry: an int (manifests written before hashes) or {"size", "sha256"}."""
    return entry if isinstance(entry, int) else int(entry["size"])


def content_problems(ckpt_dir: str | os.PathLike, files: dict[str, int | dict]) -> list[str]:
    """Files of `ckpt_dir` whose SHA-256 differs from the manifest `files` ([] when all agree). Entries
    without a hash (older manifests) are not checked; missing files are checkpoint_problems' to report."""
    ckpt = Path(ckpt_dir)
    hashed = [(rel, e[HASH]) for rel, e in files.items() if isinstance(e, dict) and (ckpt / rel).is_file()]
    with ThreadPoolExecutor(_workers()) as pool:
        digests = list(pool.map(lambda item: file_digest(ckpt / item[0]), hashed))
    return [
        f"{ckpt / rel} has {HASH} {got[:12]}..., the manifest says {want[:12]}... (corrupted or replaced)"
        for (rel, want), got in zip(hashed, digests)
        if got != want
    ]
