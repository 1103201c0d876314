"""Record sources: random access to raw LLaVA records without parsing or tokenising up front.

A source maps an index to a raw record dict (``id``, ``image``, ``conversations``, optional
``system``) and to the image folder its relative paths resolve against. JSONL files are indexed by
byte offsets in one scan that also parses each line once (then drops it): a malformed or non-UTF-8
line is an error naming the file, line and column, or under ``bad_record_policy="skip"`` a line left
out and counted (``malformed``); duplicate record ids are counted too (``duplicate_ids``). JSON files
are loaded with the stdlib and cached as JSONL, keyed on their content.
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
    """Base: ``len(source)``, ``source.record(i)``, ``source.folder(i)``; what the scan found wrong in
    ``malformed`` (where each skipped line was) and ``duplicate_ids`` (count, a few examples)."""

    image_folder: str = ""
    malformed: tuple[str, ...] = ()
    duplicate_ids: tuple[int, tuple[str, ...]] = (0, ())

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

    The first open parses it with the stdlib and writes an equivalent JSONL cache (keyed by a hash of
    the file's content) under ``cache_dir`` (default ``~/.cache/llava_train/json_index``); later
    opens, every rank and every DataLoader worker then read the cache lazily like a JSONL file.
    Where the cache cannot be written, the records are packed in memory (PackedSource). A file that is
    not UTF-8 JSON is an error naming its line and column (under any policy: one broken list has no
    records to keep).
    """
    cache = _jsonl_cache_path(Path(path), cache_dir)
    if cache.is_file():
        return JsonlSource(cache, image_folder)
    records = _load_json(Path(path))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    try:
        _write_jsonl_atomic(records, cache)
    except OSError:
        source = PackedSource(records, image_folder)
        source.duplicate_ids = _duplicates(r.get("id") if isinstance(r, dict) else None for r in records)
        return source
    return JsonlSource(cache, image_folder)


def _load_json(path: Path) -> Any:
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - data.rfind(b"\n", 0, err.start)
        detail = f"not UTF-8 (byte {data[err.start]:#04x})"
    except json.JSONDecodeError as err:
        line, col, detail = err.lineno, err.colno, f"not valid JSON ({err.msg})"
    raise ValueError(f"{path}:{line}:{col}: {detail}. Fix the file: a UTF-8 JSON list of records.")


def _jsonl_cache_path(path: Path, cache_dir: str | None) -> Path:
    """The cache's name: a hash of the file's bytes (reading them costs a fraction of parsing them), so a
    same-size edit that kept the mtime still gets a fresh cache."""
    from llava_train.data.tokenizers import default_cache_dir

    with open(path, "rb") as f:
        key = hashlib.file_digest(f, "sha256").hexdigest()[:24]
    root = Path(cache_dir) if cache_dir else default_cache_dir() / "json_index"
    return root / f"{path.stem}-{key}.jsonl"


def _duplicates(ids: Any) -> tuple[int, tuple[str, ...]]:
    """(how many ids repeat an earlier one, up to 5 of them); None ids are not counted."""
    seen: set[str] = set()
    count, examples = 0, []
    for rid in ids:
        if rid is None:
            continue
        key = str(rid)
        if key in seen:
            count += 1
            if len(examples) < 5:
                examples.append(key)
        seen.add(key)
    return count, tuple(examples)


def _write_jsonl_atomic(records: Sequence[Any], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, target)  # atomic: concurrent ranks never read half a cache


class JsonlSource(RecordSource):
    """A ``.jsonl`` file read lazily: one scan records each line's byte offset (8 bytes per record)."""

    def __init__(self, path: str | os.PathLike, image_folder: str = "", bad_record_policy: str = "strict"):
        self.path, self.image_folder = str(path), image_folder
        self.offsets, self.malformed, self.duplicate_ids = _scan_jsonl(self.path, bad_record_policy == "skip")
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


def _scan_jsonl(path: str, skip_bad: bool) -> tuple[array, tuple[str, ...], tuple[int, tuple[str, ...]]]:
    """(byte offsets of the good non-blank lines, where the malformed ones are, duplicate ids). Each line
    is parsed once and dropped; a malformed line raises ValueError naming file:line:column unless
    ``skip_bad``."""
    offsets, malformed, ids = array("q"), [], []
    pos = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    where = _where(path, line_no, line, err)
                    if not skip_bad:
                        raise ValueError(
                            f"{where}. Fix the line (one UTF-8 JSON object per line), or skip such lines "
                            "with data.bad_record_policy=skip (counted as malformed_record)."
                        ) from None
                    malformed.append(where)
                else:
                    offsets.append(pos)
                    ids.append(record.get("id") if isinstance(record, dict) else None)
            pos += len(line)
    return offsets, tuple(malformed), _duplicates(ids)


def _where(path: str, line_no: int, line: bytes, err: Exception) -> str:
    if isinstance(err, UnicodeDecodeError):
        return f"{path}:{line_no}:{err.start + 1}: not UTF-8 (byte {line[err.start]:#04x})"
    return f"{path}:{line_no}:{err.colno}: not valid JSON ({err.msg})"


class SubsetSource(RecordSource):
    """Some records of another source, by index."""

    def __init__(self, source: RecordSource, indices: Sequence[int]):
        self.source, self.indices = source, array("q", indices)
        self.malformed, self.duplicate_ids = source.malformed, source.duplicate_ids

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
        self.malformed = tuple(m for s in self.sources for m in s.malformed)
        dupes = [s.duplicate_ids for s in self.sources]  # within each file
        self.duplicate_ids = (sum(n for n, _ in dupes), tuple(e for _, ex in dupes for e in ex)[:5])
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
    path: str | os.PathLike,
    image_folder: str = "",
    cache_dir: str | None = None,
    bad_record_policy: str = "strict",
) -> RecordSource:
    """A source for a ``.json`` or ``.jsonl`` file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return JsonlSource(path, image_folder, bad_record_policy)
    if suffix == ".json":
        return json_source(path, image_folder, cache_dir)
    raise ValueError(f"{path}: expected a .json or .jsonl file (or a .yaml mixture / HF dataset dir)")
