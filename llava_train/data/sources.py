"""Record sources: random access to raw LLaVA records without parsing or tokenising up front.

A source maps an index to a raw record dict (``id``, ``image``, ``conversations``, optional
``system``) and to the image folder its relative paths resolve against. JSONL files are indexed by
byte offsets (one scan, nothing parsed); JSON files are loaded with the stdlib.
"""

from __future__ import annotations

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


def json_source(path: str | os.PathLike, image_folder: str = "") -> ListSource:
    """A LLaVA ``.json`` file: a list of records."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return ListSource(records, image_folder)


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


def file_source(path: str | os.PathLike, image_folder: str = "") -> RecordSource:
    """A source for a ``.json`` or ``.jsonl`` file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return JsonlSource(path, image_folder)
    if suffix == ".json":
        return json_source(path, image_folder)
    raise ValueError(f"{path}: expected a .json or .jsonl file (or a .yaml mixture / HF dataset dir)")
