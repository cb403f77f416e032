"""One image-text sample, the ways a sample can be bad, and how bad ones are counted.

A web-scale run meets every kind of broken input: empty files, HTML saved as
.jpg, images cut off mid-download, 20000x20000 "images" that would take gigabytes
to decode, captions in Latin-1. None of that may stop a run, and none of it may
vanish silently. So each stage that can drop a sample (reading a shard, decoding
an image) takes a `FailureCounts`, records why it dropped what it dropped, and
the caller checks the totals against a threshold with `check_failure_rate`.

Counting is per stage: `ok` is what that stage passed on. A later stage's counts
are joined to an earlier one's with `FailureCounts.followed_by`.
"""

from __future__ import annotations

import enum
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

# The image members a shard may hold, in order of preference when a key has several.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Far above any photo worth training on (8000x8000), far below what exhausts a worker's memory.
DEFAULT_MAX_PIXELS = 64_000_000
# How many example messages per reason a FailureCounts keeps (and logs).
EXAMPLES_PER_REASON = 3


class FailureReason(str, enum.Enum):
    """Why a sample (or a whole shard) was skipped. The values are stable metric names."""

    CORRUPT_IMAGE = "corrupt_image"
    TRUNCATED_IMAGE = "truncated_image"
    ZERO_BYTE_IMAGE = "zero_byte_image"
    NOT_AN_IMAGE = "not_an_image"
    IMAGE_TOO_LARGE = "image_too_large"
    EMPTY_CAPTION = "empty_caption"
    NON_UTF8_CAPTION = "non_utf8_caption"
    MISSING_IMAGE = "missing_image"
    MISSING_CAPTION = "missing_caption"
    UNREADABLE_SHARD = "unreadable_shard"


class BadSample(Exception):
    """A sample that cannot be used, with the reason it will be counted under."""

    def __init__(self, reason: FailureReason, detail: str = ""):
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


class DataError(RuntimeError):
    """A data source is too broken to train on; the message names the source."""


@dataclass
class Sample:
    """A raw image-text pair as stored: the image is still encoded bytes."""

    key: str
    image: bytes
    caption: str
    image_ext: str = "jpg"
    meta: dict = field(default_factory=dict)
    source: str = ""

    def to_row(self) -> dict:
        """A flat dict with a fixed schema (meta as a JSON string), as Ray Data rows want."""
        return {"key": self.key, "image": self.image, "image_ext": self.image_ext,
                "caption": self.caption, "meta": json.dumps(self.meta), "source": self.source}

    @classmethod
    def from_row(cls, row: dict) -> "Sample":
        meta = row.get("meta") or "{}"
        return cls(key=row["key"], image=bytes(row["image"]), caption=row["caption"],
                   image_ext=row.get("image_ext", "jpg"),
                   meta=json.loads(meta) if isinstance(meta, str) else dict(meta),
                   source=row.get("source", ""))


@dataclass
class LabeledImage:
    """An image with its class, for zero-shot classification."""

    key: str
    image: bytes
    class_index: int
    class_name: str
    image_ext: str = "jpg"
    source: str = ""


@dataclass
class FailureCounts:
    """Samples passed on (`ok`) and skipped (by reason), with a few examples per reason.

    Picklable and mergeable (`+`, `merge`), so each Ray task can count its own
    shards and the driver can add the counts up; `to_dict`/`from_dict` carry it
    through JSON, metrics or Arrow columns.
    """

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def accept(self, n: int = 1) -> None:
        self.ok += n

    def reject(self, reason: FailureReason, source: str = "", key: str = "", detail: str = "") -> None:
        reason = FailureReason(reason)
        self.failed[reason.value] = self.failed.get(reason.value, 0) + 1
        where = f"{source}:{key}" if key else source
        message = f"{where}: {detail}" if detail else where
        kept = self.examples.setdefault(reason.value, [])
        first_few = len(kept) < EXAMPLES_PER_REASON
        if first_few:
            kept.append(message)
        # Bad samples are common: log the first few. A lost shard is rare and costly: log every one.
        if first_few or reason is FailureReason.UNREADABLE_SHARD:
            log.warning("skipped (%s) %s", reason.value, message)

    def __getitem__(self, reason: FailureReason | str) -> int:
        return self.failed.get(FailureReason(reason).value, 0)

    @property
    def num_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def total(self) -> int:
        return self.ok + self.num_failed

    @property
    def failure_fraction(self) -> float:
        return self.num_failed / self.total if self.total else 0.0

    def merge(self, other: "FailureCounts") -> "FailureCounts":
        """Adds `other` (the same stage, other shards) into self; returns self."""
        self.ok += other.ok
        for reason, n in other.failed.items():
            self.failed[reason] = self.failed.get(reason, 0) + n
        for reason, messages in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(messages[: EXAMPLES_PER_REASON - len(kept)])
        return self

    def __add__(self, other: "FailureCounts") -> "FailureCounts":
        return FailureCounts().merge(self).merge(other)

    def followed_by(self, later: "FailureCounts") -> "FailureCounts":
        """End-to-end counts of two chained stages: both stages' failures, the later stage's ok."""
        joined = self + later
        joined.ok = later.ok
        return joined

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failed": dict(self.failed),
                "examples": {r: list(m) for r, m in self.examples.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "FailureCounts":
        failed = {FailureReason(r).value: int(n) for r, n in data.get("failed", {}).items()}
        return cls(ok=int(data.get("ok", 0)), failed=failed,
                   examples={r: list(m) for r, m in data.get("examples", {}).items()})

    def as_metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat {name: count} for a metrics logger: every reason (zeros included), plus ok."""
        return {f"{prefix}ok": self.ok, **{f"{prefix}{r.value}": self[r] for r in FailureReason}}

    def summary(self) -> str:
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.failed.items()))
        return f"{self.ok} ok, {self.num_failed} skipped" + (f" ({parts})" if parts else "")


def check_failure_rate(counts: FailureCounts, max_fraction: float, source: str) -> None:
    """Raises DataError naming `source` if it gave nothing usable or too much of it was bad."""
    if counts.ok == 0:
        detail = f": every item failed ({counts.summary()})" if counts.total else ""
        raise DataError(f"data source {source!r} yielded no usable sample{detail}; examples: {counts.examples}")
    if counts.failure_fraction > max_fraction:
        raise DataError(
            f"data source {source!r}: {counts.failure_fraction:.1%} of items failed, more than the allowed "
            f"{max_fraction:.1%} ({counts.summary()}); examples: {counts.examples}"
        )


_MAGIC = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG", b"GIF87a": "GIF", b"GIF89a": "GIF",
          b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def _looks_like_image(data: bytes) -> bool:
    """True when the leading bytes are an image signature, though the rest may be broken."""
    return (data[:4] == b"RIFF" and data[8:12] == b"WEBP") or any(data.startswith(m) for m in _MAGIC)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Fully decodes `data` to an RGB image, or raises BadSample with the reason.

    The pixel limit is checked from the header before any pixel is decoded, which
    also makes PIL's own decompression-bomb error and warning redundant (both are
    caught). `draft_size` lets a JPEG decode at a reduced scale no smaller than
    that many pixels per side, which is much faster for large photos.
    """
    if len(data) == 0:
        raise BadSample(FailureReason.ZERO_BYTE_IMAGE, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadSample(FailureReason.IMAGE_TOO_LARGE, str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        reason = FailureReason.CORRUPT_IMAGE if _looks_like_image(data) else FailureReason.NOT_AN_IMAGE
        raise BadSample(reason, f"{type(err).__name__}: {err}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample(FailureReason.IMAGE_TOO_LARGE, f"{width}x{height} exceeds max_pixels={max_pixels}")
    if width == 0 or height == 0:
        raise BadSample(FailureReason.CORRUPT_IMAGE, f"{width}x{height} image")
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise BadSample(FailureReason.IMAGE_TOO_LARGE, str(err)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err)
        truncated = "truncated" in message or isinstance(err, EOFError)
        reason = FailureReason.TRUNCATED_IMAGE if truncated else FailureReason.CORRUPT_IMAGE
        raise BadSample(reason, f"{type(err).__name__}: {message}") from None


def decode_caption(raw: bytes) -> str:
    """Strict UTF-8 text without surrounding whitespace, or BadSample."""
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not part of the caption
    except UnicodeDecodeError as err:
        raise BadSample(FailureReason.NON_UTF8_CAPTION, str(err)) from None
    return clean_caption(text)


def clean_caption(text: str | None) -> str:
    """Checks a caption that is already text (from CSV, JSON, Parquet) the way decode_caption does.

    Text read with errors="surrogateescape" carries undecodable bytes as lone
    surrogates; those make the caption non-UTF-8 here.
    """
    if text is None:
        raise BadSample(FailureReason.MISSING_CAPTION, "caption is null")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadSample(FailureReason.NON_UTF8_CAPTION, str(err)) from None
    stripped = text.strip()
    if not stripped:
        raise BadSample(FailureReason.EMPTY_CAPTION, f"{text!r}")
    return stripped


def parse_meta(raw: str | bytes | None) -> dict:
    """Optional JSON metadata as a dict; never worth dropping a pair for, so bad JSON becomes {"json_error": why}."""
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError as err:
        return {"json_error": str(err)}
    return meta if isinstance(meta, dict) else {"json": meta}


def make_key(name: str, index: int | None = None) -> str:
    """A shard-safe key from a file name: extension dropped, other dots to '_', optional '_<index>'."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    key = stem.replace(".", "_")
    return key if index is None else f"{key}_{index}"


def guess_image_ext(data: bytes) -> str:
    """The file extension an image's leading bytes suggest ('jpg' when unknown)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, fmt in _MAGIC.items():
        if data.startswith(magic):
            return {"JPEG": "jpg"}.get(fmt, fmt.lower())
    return "jpg"


def decode_samples(
    samples: Iterable[Sample], counts: FailureCounts, max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
) -> Iterator[tuple[Sample, Image.Image]]:
    """(sample, RGB image) for every sample whose image decodes; the rest are counted in `counts`."""
    for sample in samples:
        try:
            image = decode_image(sample.image, max_pixels, draft_size)
        except BadSample as bad:
            counts.reject(bad.reason, sample.source, sample.key, bad.detail)
            continue
        counts.accept()
        yield sample, image
