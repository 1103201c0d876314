"""Bad-record errors: one exception type carrying a machine-readable reason kind."""

from __future__ import annotations

# Reason kinds a record can be rejected for; the `skip` policy counts them by these names.
BAD_RECORD_KINDS = (
    "missing_image",
    "unreadable_image",
    "image_too_large",
    "image_count_mismatch",
    "bad_conversation",
    "roles_out_of_order",
    "too_long",
    "path_escapes_root",
    "malformed_record",
)

_FIXES = {
    "missing_image": "check `image_folder` and the record's `image` path",
    "unreadable_image": "re-encode or remove the file (it is truncated, corrupt or empty)",
    "image_too_large": (
        "downscale the image, or raise `max_image_pixels` (it cannot admit more than PIL's own limit, "
        "2 x PIL.Image.MAX_IMAGE_PIXELS = 178956970 pixels)"
    ),
    "image_count_mismatch": "make the number of `<image>` tags equal the number of images in `image`",
    "bad_conversation": "`conversations` must be a non-empty list of {from, value} turns with text",
    "roles_out_of_order": "turns must alternate human/gpt, starting with human (an optional system first)",
    "too_long": "raise `model.model_max_length`, shorten the record, or use bad_record_policy=skip",
    "path_escapes_root": "use a relative path inside `image_folder` (no absolute paths, `..` or symlinks out)",
    "malformed_record": "fix the line: one UTF-8 JSON object per line",
}


class BadRecordError(ValueError):
    """A record that cannot become a training sample.

    Attributes:
        kind: one of BAD_RECORD_KINDS.
        record_id: the record's `id` (or index) when known.
    """

    def __init__(self, kind: str, detail: str, record_id: str | None = None):
        if kind not in BAD_RECORD_KINDS:
            raise ValueError(f"unknown bad-record kind {kind!r}; expected one of {BAD_RECORD_KINDS}")
        self.kind, self.detail, self.record_id = kind, detail, record_id
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"record {self.record_id!r}: " if self.record_id is not None else ""
        return f"{where}{self.kind}: {self.detail}. Fix: {_FIXES[self.kind]}."

    def with_record(self, record_id: str) -> BadRecordError:
        """The same error, naming ``record_id``."""
        return BadRecordError(self.kind, self.detail, record_id)
