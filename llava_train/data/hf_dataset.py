"""HF ``datasets`` backend: Arrow (``save_to_disk``) or Parquet, memory-mapped, same records as JSON.

Columns (names configurable in DataConfig): ``id``, ``image`` (a path, a list of paths, raw bytes, or an
undecoded Image feature {"bytes", "path"}), ``conversations`` (list of {from, value}), optional
``system``. Image features are cast to ``decode=False`` so nothing is decoded before ``__getitem__``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava_train.data.config import DataConfig
from llava_train.data.sources import RecordSource


class HFSource(RecordSource):
    """Random access to a ``datasets.Dataset`` as LLaVA records."""

    def __init__(self, dataset: Any, cfg: DataConfig):
        self.dataset, self.cfg, self.image_folder = (
            _undecoded(dataset, cfg.image_column),
            cfg,
            cfg.image_folder,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> dict[str, Any]:
        row = self.dataset[index]
        record = {
            "id": row.get(self.cfg.id_column, index),
            "image": _image_field(row.get(self.cfg.image_column)),
            "conversations": row.get(self.cfg.conversations_column),
        }
        if row.get("system"):
            record["system"] = row["system"]
        return record


def _undecoded(dataset: Any, column: str) -> Any:
    """Cast an Image feature column to decode=False (bytes / path dicts)."""
    from datasets import Image

    feature = dataset.features.get(column) if hasattr(dataset, "features") else None
    if isinstance(feature, Image):
        return dataset.cast_column(column, Image(decode=False))
    return dataset


def _image_field(value: Any) -> Any:
    """Paths stay paths (checked against the image root later); Image dicts with bytes become bytes."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    if isinstance(value, list):
        return [_image_field(v) for v in value]
    return value


def hf_source(path: str, cfg: DataConfig) -> HFSource:
    """Open a ``save_to_disk`` directory or a directory of ``*.parquet`` files (memory-mapped)."""
    from datasets import Dataset, load_from_disk

    if cfg.streaming:
        raise NotImplementedError(
            "streaming HF datasets are not supported yet; use a save_to_disk or parquet dir"
        )
    folder = Path(path)
    if (folder / "state.json").is_file() or (folder / "dataset_info.json").is_file():
        dataset = load_from_disk(str(folder))
    else:
        files = sorted(str(p) for p in folder.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"{path}: neither a datasets.save_to_disk dir nor a folder of *.parquet files"
            )
        dataset = Dataset.from_parquet(files)
    if hasattr(dataset, "keys") and not hasattr(dataset, "features"):  # a DatasetDict
        raise ValueError(f"{path} holds several splits {list(dataset.keys())}; point data_path at one split")
    return HFSource(dataset, cfg)
