"""Parquet files of image-text pairs: encoded image bytes and a caption per row.

Files are read one row group at a time, so memory stays bounded by the row
group, not the file. Column names are configurable because every crawl names
them differently; an image column may be plain binary or the {bytes, path}
struct that Hugging Face datasets writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clip_ray.data.formats.samples import (
    BadSample, FailureCounts, FailureReason, Sample, clean_caption, decode_caption, guess_image_ext, make_key,
    parse_meta,
)
from clip_ray.storage import AtomicFile, ClosesOrAborts, basename, resolve

PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("image", pa.binary()),
    ("image_ext", pa.string()),
    ("caption", pa.string()),
    ("json", pa.string()),  # the sample's meta dict as JSON text; null when there is none
])


class ParquetWriter(ClosesOrAborts):
    """Writes samples to one Parquet file in row groups of `rows_per_group`.

    The file is written as `path + '.tmp'` and renamed on close, so an
    interrupted write leaves nothing under `path`; a re-run replaces `path`.
    """

    def __init__(self, path: str | Path, rows_per_group: int = 1000, filesystem: pafs.FileSystem | None = None):
        if rows_per_group <= 0:
            raise ValueError(f"rows_per_group must be positive, got {rows_per_group}")
        self.path = str(path)
        self.rows_per_group = rows_per_group
        self.num_rows = 0
        fs, inner = resolve(self.path, filesystem)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        self._file = AtomicFile(inner, fs)
        self._writer = pq.ParquetWriter(self._file.stream, PARQUET_SCHEMA)
        self._rows: dict[str, list] = {name: [] for name in PARQUET_SCHEMA.names}

    def write(self, key: str, image: bytes, caption: str, image_ext: str = "jpg", meta: dict | None = None) -> None:
        row = {"key": key, "image": bytes(image), "image_ext": image_ext.lower().lstrip("."), "caption": caption,
               "json": None if meta is None else json.dumps(meta, ensure_ascii=False)}
        for name, value in row.items():
            self._rows[name].append(value)
        self.num_rows += 1
        if len(self._rows["key"]) == self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self._rows["key"]:
            self._writer.write_table(pa.table(self._rows, schema=PARQUET_SCHEMA))
            self._rows = {name: [] for name in PARQUET_SCHEMA.names}

    def close(self) -> str:
        """Writes the last row group and moves the file into place; returns its path."""
        self._flush()
        self._writer.close()
        self._file.commit()
        return self.path

    def abort(self) -> None:
        """Discards the file being written."""
        try:
            self._writer.close()
        finally:
            self._file.discard()


def _image_bytes(value) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face's Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return None if value is None else bytes(value)


def _caption(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return decode_caption(bytes(value))
    return clean_caption(value)


def _row_to_sample(row: dict, index: int, source: str, columns: dict[str, str]) -> Sample:
    """Raises BadSample for a row that cannot be a sample."""
    image = _image_bytes(row.get(columns["image"]))
    if image is None:
        raise BadSample(FailureReason.MISSING_IMAGE, f"column {columns['image']!r} is null")
    if len(image) == 0:
        raise BadSample(FailureReason.ZERO_BYTE_IMAGE, "0 bytes")
    caption = _caption(row.get(columns["caption"]))
    key = row.get(columns["key"])
    key = str(key) if key is not None else make_key(basename(source), index)
    image_ext = row.get(columns["image_ext"]) or guess_image_ext(image)
    return Sample(key=key, image=image, caption=caption, image_ext=image_ext,
                  meta=parse_meta(row.get(columns["meta"])), source=source)


def read_parquet_file(
    path: str | Path,
    counts: FailureCounts | None = None,
    filesystem: pafs.FileSystem | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    key_column: str = "key",
    meta_column: str = "json",
    image_ext_column: str = "image_ext",
) -> Iterator[Sample]:
    """Yields the usable rows of one Parquet file as samples; never raises on bad data.

    The image and caption columns must exist (a file without them counts as one
    UNREADABLE_SHARD); key, meta (JSON text) and image-ext columns are optional.
    Without a key column a row's key is '<file stem>_<row number>'. Null or empty
    cells count as missing image/caption, zero-byte image or empty caption; a
    file that cannot be opened or breaks off mid-way counts once as UNREADABLE_SHARD
    after the row groups read before the break.
    """
    counts = counts if counts is not None else FailureCounts()
    source = str(path)
    columns = {"image": image_column, "caption": caption_column, "key": key_column,
               "meta": meta_column, "image_ext": image_ext_column}
    row_index = 0
    try:
        fs, inner = resolve(source, filesystem)
        with fs.open_input_file(inner) as file:
            parquet = pq.ParquetFile(file)
            names = parquet.schema_arrow.names
            for required in (image_column, caption_column):
                if required not in names:
                    raise ValueError(f"no column {required!r} (columns: {names})")
            wanted = [name for name in dict.fromkeys(columns.values()) if name in names]
            for group in range(parquet.num_row_groups):
                rows = parquet.read_row_group(group, columns=wanted).to_pylist()
                for row in rows:
                    try:
                        sample = _row_to_sample(row, row_index, source, columns)
                    except BadSample as bad:
                        counts.reject(bad.reason, source, str(row.get(key_column, row_index)), bad.detail)
                    else:
                        counts.accept()
                        yield sample
                    row_index += 1
    except (OSError, pa.ArrowException, ValueError) as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, source, "", f"{type(err).__name__}: {err}")
