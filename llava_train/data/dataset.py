"""The supervised dataset: raw LLaVA records -> tokenised, labelled samples with pixel tensors.

Nothing is tokenised and no image is opened when the dataset is built; all of it happens in
``__getitem__``. Two notions of length (documented because samplers and checks use different ones):

- ``lengths`` / ``modality_lengths`` (for samplers, all records): a cheap *estimate*, word count of
  all turns plus a nominal image-token count per image (as LLaVA's); modality_lengths is negative
  for text-only records. Computed on first use by reading every record once, never tokenising.
- ``sample["length"]`` (per sample, at ``__getitem__``): the *exact* length the model will see, text
  tokens + image feature tokens (anyres.num_image_tokens: crops, unpadding and newline tokens
  included). It is checked against the model's ``model_max_length`` (``VisionSpec``).

Bad records follow ``bad_record_policy``: ``strict`` raises BadRecordError naming the record and the
fix; ``skip`` counts the kind (``bad_record_stats()``), logs it, and returns the next good record, so
the batch size never changes. In a packed row (``pack_samples``) a bad record is dropped instead, so that
the row never outgrows its planned length. Counters live in shared memory so DataLoader workers add to
them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from llava_train.constants import DEFAULT_IMAGE_TOKEN
from llava_train.data.config import DataConfig, VisionSpec
from llava_train.data.conversation import Template, get_template, normalize_conversation
from llava_train.data.errors import BAD_RECORD_KINDS, BadRecordError
from llava_train.data.image import load_image, mean_colour, process_images, read_image_size
from llava_train.data.preprocess import TokenizedConversation, check_template_tokens, tokenize_conversation
from llava_train.data.sources import RecordSource

logger = logging.getLogger(__name__)

_COUNTERS = (*BAD_RECORD_KINDS, "truncated_samples", "truncated_turns")


class LazySupervisedDataset(Dataset):
    """Map-style dataset of LLaVA samples (see the module docstring for lengths and bad records).

    A sample is a dict: input_ids [s] long, labels [s] long, images ([n_img, 3, S, S] for pad /
    square, a list of [1 + crops, 3, S, S] for anyres, None without image), image_sizes [(w, h)],
    sample_id str, length int (exact, image tokens included).
    """

    def __init__(
        self,
        source: RecordSource,
        tokenizer: Any,
        image_processor: Any,
        cfg: DataConfig,
        vision: VisionSpec,
    ):
        self.source, self.tokenizer, self.image_processor, self.cfg = source, tokenizer, image_processor, cfg
        self.vision = vision
        self.template: Template = get_template(cfg.template)
        check_template_tokens(self.template, tokenizer, self.vision.mm_use_im_start_end)
        self._counts = torch.zeros(len(_COUNTERS), dtype=torch.long).share_memory_()
        self._estimates: tuple[list[int], list[int]] | None = None
        self._exact_lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.source)

    # ---- lengths for samplers (estimates) ----
    @property
    def lengths(self) -> list[int]:
        """Estimated tokens per record (words + nominal image tokens), for length grouping."""
        return self._length_estimates()[0]

    @property
    def modality_lengths(self) -> list[int]:
        """Estimated length, positive with image(s), negative for text-only (LLaVA's convention)."""
        return self._length_estimates()[1]

    def _length_estimates(self) -> tuple[list[int], list[int]]:
        if self._estimates is None:
            per_image = self._nominal_image_tokens()
            lengths, modality = [], []
            for i in range(len(self.source)):
                words, n_images = _word_and_image_counts(self.source.record(i))
                lengths.append(words + per_image * n_images)
                modality.append(lengths[-1] if n_images else -max(words, 1))
            self._estimates = (lengths, modality)
        return self._estimates

    def _nominal_image_tokens(self) -> int:
        """Feature tokens of a square image twice the crop side (the estimate used for every image)."""
        side = 2 * self.vision.crop_size
        return self._image_tokens((side, side))

    def _image_tokens(self, size: tuple[int, int]) -> int:
        return self.vision.image_tokens(size)

    # ---- samples ----
    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._first_good(index, self.build_sample, count=True)

    def _first_good(self, index: int, build: Any, count: bool) -> Any:
        """``build(index)``, or under the 'skip' policy that of the next good record (deterministic)."""
        if self.cfg.bad_record_policy == "strict":
            return build(index)
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                return build(candidate)
            except BadRecordError as err:
                if count:
                    self._count(err.kind)
                    logger.warning("skipping bad record (%s): %s", err.kind, err)
        raise RuntimeError(f"every one of the {len(self)} records is bad; see bad_record_stats()")

    def pack_samples(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The samples of one packed row (``PackedDataset``), in order.

        Under 'skip' a bad record is dropped from its row (counted and logged), not replaced: the
        replacement's length is another record's, and a JPEG whose data is corrupt past a valid header
        had its own length in ``exact_lengths``, so a replacement could overfill the row. A row whose
        records are all bad gets the usual replacement of its first record: one sample fits any row.
        """
        if self.cfg.bad_record_policy == "strict":
            return [self.build_sample(i) for i in indices]
        samples = []
        for i in indices:
            try:
                samples.append(self.build_sample(i))
            except BadRecordError as err:
                self._count(err.kind)
                logger.warning("dropping bad record (%s) from its packed row: %s", err.kind, err)
        return samples or [self._first_good(indices[0], self.build_sample, count=False)]

    def build_sample(self, index: int) -> dict[str, Any]:
        """The sample of record ``index``; BadRecordError (naming the record) if it is bad."""
        return self._with_record_id(index, self._build)

    def _with_record_id(self, index: int, build: Any) -> Any:
        record = self.source.record(index)
        record_id = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        try:
            return build(record, index, record_id)
        except BadRecordError as err:
            raise err.with_record(record_id) from None

    def _parse(self, record: Any) -> tuple[str | None, list, list[str]]:
        """(system, turns, image paths) of a record, checked: BadRecordError if it is malformed."""
        if not isinstance(record, dict):
            raise BadRecordError("bad_conversation", f"record is a {type(record).__name__}, not a dict")
        system, turns = normalize_conversation(record.get("conversations"), record.get("system"))
        if turns[-1][0] != "assistant":
            raise BadRecordError("bad_conversation", "the conversation does not end with an assistant reply")
        paths = _image_paths(record.get("image"))
        n_tags = sum(text.count(DEFAULT_IMAGE_TOKEN) for role, text in turns if role == "user")
        n_reply_tags = sum(text.count(DEFAULT_IMAGE_TOKEN) for role, text in turns if role == "assistant")
        if n_tags != len(paths) or n_reply_tags:
            raise BadRecordError(
                "image_count_mismatch",
                f"{n_tags} <image> tags in user turns, {n_reply_tags} in replies, {len(paths)} images",
            )
        return system, turns, paths

    def _tokenize(self, system: str | None, turns: list) -> TokenizedConversation:
        return tokenize_conversation(
            turns,
            self.template,
            self.tokenizer,
            system,
            mm_use_im_start_end=self.vision.mm_use_im_start_end,
            strip_replies=self.cfg.strip_replies,
        )

    def _build(self, record: Any, index: int, record_id: str) -> dict[str, Any]:
        system, turns, paths = self._parse(record)
        images = [self._load(p, self.source.folder(index)) for p in paths]
        tokens, kept = self._fit_length(self._tokenize(system, turns), [im.size for im in images])
        images = images[:kept]
        pixels, sizes = process_images(
            images, self.image_processor, self.vision.image_aspect_ratio, self.vision.image_grid_pinpoints
        )
        return {
            "input_ids": torch.tensor(tokens.input_ids, dtype=torch.long),  # [s]
            "labels": torch.tensor(tokens.labels, dtype=torch.long),  # [s]
            "images": pixels if images else None,
            "image_sizes": sizes,
            "sample_id": record_id,
            "length": self.exact_length(tokens, sizes),
        }

    def _load(self, rel_path: str, folder: str) -> Any:
        path = resolve_image_path(rel_path, folder)
        background = mean_colour(self.image_processor)
        return load_image(path, max_pixels=self.cfg.max_image_pixels, background=background)

    def exact_length(self, tokens: TokenizedConversation, sizes: list[tuple[int, int]]) -> int:
        """Tokens the model sees: text ids + every image's feature tokens (placeholders replaced)."""
        return len(tokens.input_ids) - tokens.num_images + sum(self._image_tokens(s) for s in sizes)

    def _fit_length(
        self, tokens: TokenizedConversation, sizes: list[tuple[int, int]], count: bool = True
    ) -> tuple[TokenizedConversation, int]:
        """(tokens, images kept): trailing whole rounds (and their images) dropped to fit; too_long if
        even one round does not fit. Truncations are counted when ``count``."""
        limit = self.vision.model_max_length
        if self.exact_length(tokens, sizes) <= limit:
            return tokens, len(sizes)
        for keep in range(len(tokens.round_ends) - 1, 0, -1):
            cut = tokens.truncated(keep)
            if self.exact_length(cut, sizes[: cut.num_images]) <= limit:
                if count:
                    self._count("truncated_samples")
                    self._count("truncated_turns", len(tokens.round_ends) - keep)
                return cut, cut.num_images
        one_round = tokens.truncated(1)
        first = self.exact_length(one_round, sizes[: one_round.num_images])
        raise BadRecordError(
            "too_long", f"its first round alone is {first} tokens > model_max_length={limit}"
        )

    # ---- exact lengths from tokens and image headers (packing) ----
    def exact_lengths(self, num_workers: int = 0) -> list[int]:
        """``sample["length"]`` of every sample, without decoding or processing a single image.

        Packing bins samples on these. Each record is tokenised and its images' sizes are read from
        their headers; under the 'skip' policy a bad record gets the length of the record that replaces
        it (as in ``__getitem__``), under 'strict' the first bad record raises. Computed once, then
        cached on the dataset; ``num_workers`` > 0 spreads the work over DataLoader workers. Counters
        (bad records, truncations) are left to ``__getitem__``, so nothing is counted twice.
        """
        if self._exact_lengths is None:
            view = _ExactLengthView(self)
            if num_workers:
                loader = DataLoader(view, batch_size=None, num_workers=num_workers)
                self._exact_lengths = [int(n) for n in loader]
            else:
                self._exact_lengths = [view[i] for i in range(len(view))]
        return list(self._exact_lengths)

    def _exact_length_of(self, index: int) -> int:
        return self._first_good(index, lambda i: self._with_record_id(i, self._measure), count=False)

    def _measure(self, record: Any, index: int, record_id: str) -> int:
        system, turns, paths = self._parse(record)
        folder = self.source.folder(index)
        sizes = [
            read_image_size(resolve_image_path(p, folder), max_pixels=self.cfg.max_image_pixels)
            for p in paths
        ]
        tokens, kept = self._fit_length(self._tokenize(system, turns), sizes, count=False)
        return self.exact_length(tokens, sizes[:kept])

    # ---- statistics ----
    def _count(self, kind: str, n: int = 1) -> None:
        self._counts[_COUNTERS.index(kind)] += n  # shared memory; a rare lost update is acceptable

    def bad_record_stats(self) -> dict[str, int]:
        """Skipped bad records per kind, plus truncated_samples / truncated_turns (this process and workers)."""
        return {k: int(v) for k, v in zip(_COUNTERS, self._counts.tolist()) if v}

    def log_bad_record_stats(self) -> dict[str, int]:
        """Log and return :meth:`bad_record_stats`."""
        stats = self.bad_record_stats()
        logger.info("data: bad / truncated records so far: %s", stats or "none")
        return stats


class _ExactLengthView(Dataset):
    """Index -> exact length of a dataset's sample (what DataLoader workers compute for exact_lengths)."""

    def __init__(self, dataset: LazySupervisedDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> int:
        return self.dataset._exact_length_of(index)


def _image_paths(image: Any) -> list[str]:
    """The record's image field as a list (absent -> []), each item checked to be a path or a payload."""
    items = _image_items(image)
    if not all(isinstance(p, (str, bytes, dict)) for p in items):
        raise BadRecordError("bad_conversation", f"`image` must be a path or a list of paths, got {image!r}")
    return items


def resolve_image_path(rel_path: Any, folder: str) -> Any:
    """Absolute path of ``rel_path`` under ``folder``; path_escapes_root if it leaves it.

    Absolute paths, ``..`` and symlinks pointing outside the root are rejected (symlinks resolved).
    Bytes / {"bytes": ...} payloads (HF datasets) pass through unchanged; a {"path": ...} without bytes
    is a path and gets the same checks.
    """
    if isinstance(rel_path, dict) and not rel_path.get("bytes"):
        rel_path = rel_path.get("path")
        if not isinstance(rel_path, str) or not rel_path:
            raise BadRecordError("missing_image", "an image dict with neither bytes nor a path")
    if not isinstance(rel_path, str):
        return rel_path
    if os.path.isabs(rel_path):
        raise BadRecordError("path_escapes_root", f"absolute image path {rel_path!r}")
    root = Path(folder or ".").resolve()
    path = (root / rel_path).resolve()
    if path != root and root not in path.parents:
        raise BadRecordError(
            "path_escapes_root", f"{rel_path!r} resolves to {str(path)!r}, outside {str(root)!r}"
        )
    return path


def _word_and_image_counts(record: Any) -> tuple[int, int]:
    """(words in all turns, images) of a raw record, without validation (estimates only)."""
    if not isinstance(record, dict):
        return 0, 0
    turns = record.get("conversations") or []
    words = sum(
        len(t.get("value", "").split())
        for t in turns
        if isinstance(t, dict) and isinstance(t.get("value"), str)
    )
    return words, len(_image_items(record.get("image")))


def _image_items(image: Any) -> list[Any]:
    """The record's image field as a list (absent -> []), unchecked (length estimates read it this way)."""
    if image is None or image == "":
        return []
    return image if isinstance(image, list) else [image]


def build_dataset(
    cfg: DataConfig, tokenizer: Any, image_processor: Any, vision: VisionSpec | Any
) -> LazySupervisedDataset:
    """The dataset for ``cfg.data_path`` (.json, .jsonl, .yaml mixture, or HF dataset dir).

    ``vision``: the model's image geometry, a VisionSpec or the built model itself
    (:meth:`VisionSpec.from_model`); ``cfg.image_aspect_ratio`` may override its aspect ratio.
    """
    if not isinstance(vision, VisionSpec):
        vision = VisionSpec.from_model(vision)
    vision = vision.with_aspect_ratio(cfg.image_aspect_ratio)
    from llava_train.data.hf_dataset import hf_source
    from llava_train.data.mixture import mixture_source
    from llava_train.data.sources import file_source

    path = Path(cfg.data_path)
    if not cfg.data_path or not path.exists():
        raise FileNotFoundError(f"data_path {cfg.data_path!r} does not exist; set data.data_path")
    if path.is_dir():
        source = hf_source(str(path), cfg)
    elif path.suffix.lower() in (".yaml", ".yml"):
        source = mixture_source(str(path), cfg.image_folder, cfg.seed, cfg.cache_dir, cfg.bad_record_policy)
    else:
        source = file_source(path, cfg.image_folder, cfg.cache_dir, cfg.bad_record_policy)
    dataset = LazySupervisedDataset(source, tokenizer, image_processor, cfg, vision)
    report_source_problems(dataset)
    return dataset


def report_source_problems(dataset: LazySupervisedDataset) -> None:
    """Count the lines the source left out as malformed (once per run, not per epoch); warn once about
    duplicate record ids, since errors and skip logs name records by id."""
    source = dataset.source
    if source.malformed:
        dataset._count("malformed_record", len(source.malformed))
        logger.warning(
            "skipped %d malformed lines, e.g. %s", len(source.malformed), list(source.malformed[:3])
        )
    n, examples = source.duplicate_ids
    if n:
        logger.warning(
            "%d records repeat an earlier record's id (e.g. %s): messages that name a record by id are "
            "ambiguous for them; give every record a unique `id`.",
            n,
            list(examples),
        )
