"""Every image-text format clip-ray reads or writes, behind one import.

Readers are plain generator functions of one shard or file, so a Ray task can
call them on its share of the paths (local paths or any pyarrow URI):

    counts = FailureCounts()
    for sample in read_shard("s3://bucket/shards/00042.tar", counts=counts):
        ...

They yield `Sample`s (image still encoded; decode with `decode_samples` or
`decode_image`) and never raise on bad data: a bad sample or an unreadable
shard is skipped and counted in `counts` under its `FailureReason`, and the
first few of each reason are logged. `FailureCounts` pickles, merges and turns
into a dict, so per-task counts travel back to the driver (as a returned value,
a metric or a column), which calls `check_failure_rate` on the total.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from clip_ray.data.formats.folders import (
    list_image_folder, load_caption_csv, load_coco_captions, load_split, read_caption_csv, read_coco_captions,
    read_image_folder,
)
from clip_ray.data.formats.samples import (
    DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadSample, DataError, FailureCounts, FailureReason, LabeledImage, Sample,
    check_failure_rate, decode_caption, decode_image, decode_samples,
)
from clip_ray.data.formats.tabular import ParquetWriter, read_parquet_file
from clip_ray.data.formats.webdataset import ShardWriter, read_tar_shard
from clip_ray.storage import expand_shard_pattern, list_shards, resolve

__all__ = [
    "BadSample", "DataError", "DEFAULT_MAX_PIXELS", "FailureCounts", "FailureReason", "IMAGE_EXTENSIONS",
    "LabeledImage", "ParquetWriter", "Sample", "SHARD_EXTENSIONS", "ShardWriter",
    "check_failure_rate", "decode_caption", "decode_image", "decode_samples", "expand_shard_pattern",
    "list_image_folder", "list_shards", "load_caption_csv", "load_coco_captions", "load_split",
    "read_caption_csv", "read_coco_captions", "read_image_folder", "read_parquet_file", "read_shard",
    "read_tar_shard", "resolve",
]

SHARD_EXTENSIONS = (".tar", ".parquet")  # what `read_shard` reads; pass to `list_shards` for mixed folders


def read_shard(
    path: str | Path,
    counts: FailureCounts | None = None,
    filesystem: pafs.FileSystem | None = None,
    **parquet_columns: str,
) -> Iterator[Sample]:
    """Reads a .tar or .parquet shard by its extension; `parquet_columns` go to read_parquet_file."""
    if str(path).endswith(".parquet"):
        return read_parquet_file(path, counts, filesystem, **parquet_columns)
    return read_tar_shard(path, counts, filesystem)
