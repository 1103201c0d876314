"""Record sources: random access to raw LLaVA records without parsing or tokenising up front.

A source maps an index to a raw record dict (``id``, ``image``, ``conversations``, optional
``system``) and to the image folder its relative paths resolve against. JSONL files are indexed by
byte offsets (one scan, nothing parsed); JSON files are loaded with the stdlib.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class RecordSource:
    """Base: ``len(source)``, ``source.record(i)``, ``source.folder(i)``."""

    image_folder: str = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def folder(self, index: int) -> str:
        return self.image_folder


class ListSource(RecordSource):
    """Records held in memory (a parsed JSON list)."""

    def __init__(self, records: Sequence[dict[str, Any]], image_folder: str = ""):
        self.records, self.image_folder = records, image_folder

    def __len__(self) -> int:
        return len(self.records)

    def record(self, index: int) -> dict[str, Any]:
        return self.records[index]


class PackedSource(RecordSource):
    """Records re-serialised into one bytes blob + offsets.

    A list of dicts costs ~3x the file size and every access touches reference counts, so each
    DataLoader worker gradually copies the pages it reads (copy-on-write). One bytes object is
    about the file size and stays shared between workers; each access parses one record.
    """

    def __init__(self, records: Sequence[Any], image_folder: str = ""):
        self.image_folder = image_folder
        self.offsets = array("q", [0])
        parts = []
        for record in records:
            parts.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
            self.offsets.append(self.offsets[-1] + len(parts[-1]))
        self.blob = b"".join(parts)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        return json.loads(self.blob[self.offsets[index] : self.offsets[index + 1]])


def json_source(
    path: str | os.PathLike, image_folder: str = "", cache_dir: str | None = None
) -> RecordSource:
    """A LLaVA ``.json`` file (a list of records).

    The first open parses it with the stdlib and writes an equivalent JSONL cache (keyed by the file's
    path, size and mtime) under ``cache_dir`` (default ``~/.cache/llava_train/json_index``); later
    opens, every rank and every DataLoader worker then read the cache lazily like a JSONL file.
    Where the cache cannot be written, the records are packed in memory (PackedSource).
    """
    cache = _jsonl_cache_path(Path(path), cache_dir)
    if cache.is_file():
        return JsonlSource(cache, image_folder)
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    try:
        _write_jsonl_atomic(records, cache)
    except OSError:
        return PackedSource(records, image_folder)
    return JsonlSource(cache, image_folder)


def _jsonl_cache_path(path: Path, cache_dir: str | None) -> Path:
    from llava_train.data.tokenizers import default_cache_dir

    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "json_index"
    return root / f"{path.stem}-{key}.jsonl"


def _write_jsonl_atomic(records: Sequence[Any], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, target)  # atomic: concurrent ranks never read half a cache


class JsonlSource(RecordSource):
    """A ``.jsonl`` file read lazily: one scan records each line's byte offset (8 bytes per record)."""

    def __init__(self, path: str | os.PathLike, image_folder: str = ""):
        self.path, self.image_folder = str(path), image_folder
        self.offsets = _line_offsets(self.path)
        self._handle: Any = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, index: int) -> dict[str, Any]:
        handle = self._file()
        handle.seek(self.offsets[index])
        return json.loads(handle.readline())

    def _file(self) -> Any:
        if self._handle is None or self._pid != os.getpid():  # one handle per DataLoader worker
            self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None, "_pid": -1}


def _line_offsets(path: str) -> array:
    """Byte offsets of the non-blank lines of a file (a buffered binary scan, nothing parsed)."""
    offsets = array("q")
    pos = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets


class SubsetSource(RecordSource):
    """Some records of another source, by index."""

    def __init__(self, source: RecordSource, indices: Sequence[int]):
        self.source, self.indices = source, array("q", indices)

    def __len__(self) -> int:
        return len(self.indices)

    def record(self, index: int) -> dict[str, Any]:
        return self.source.record(self.indices[index])

    def folder(self, index: int) -> str:
        return self.source.folder(self.indices[index])


class ConcatSource(RecordSource):
    """Several sources one after the other."""

    def __init__(self, sources: Sequence[RecordSource]):
        self.sources = list(sources)
        self.starts = [0]
        for s in self.sources:
            self.starts.append(self.starts[-1] + len(s))

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, index: int) -> tuple[RecordSource, int]:
        import bisect

        k = bisect.bisect_right(self.starts, index) - 1
        return self.sources[k], index - self.starts[k]

    def record(self, index: int) -> dict[str, Any]:
        source, local = self._locate(index)
        return source.record(local)

    def folder(self, index: int) -> str:
        source, local = self._locate(index)
        return source.folder(local)


def file_source(
    path: str | os.PathLike, image_folder: str = "", cache_dir: str | None = None
) -> RecordSource:
    """A source for a ``.json`` or ``.jsonl`` file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return JsonlSource(path, image_folder)
    if suffix == ".json":
        return json_source(path, image_folder, cache_dir)
    raise ValueError(f"{path}: expected a .json or .jsonl file (or a .yaml mixture / HF dataset dir)")
