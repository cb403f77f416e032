"""One partition of a conversion: how the input is cut, and the Ray task that writes one piece.

The input is cut into partitions on the driver, deterministically: one input
shard (tar or Parquet file) is one partition; a caption table (CSV or COCO) is
cut into runs of whole images holding at most `samples_per_shard` captions.
Each partition is one Ray task that writes its own shards, named
`{partition:05d}_{part:05d}.tar` (or `.parquet`), so names depend only on the
input and the options, never on which task finished first. A caption-table
partition fits one shard, so its only shard is `..._00000`.

Next to its shards each task leaves `{partition:05d}_stats.json` (img2dataset
style): its counts, its shard names and the fingerprint the driver gave it
(clip_ray.data.offline.convert decides from it what a re-run may skip).

Keys are kept as they were, except that a '.' in one (it would start the
extension) becomes '_' and a key repeated within a partition gets '_dupN';
stats count these as `renamed_keys`.

Apart from the driver because this is what runs on any node, per partition,
and what curation reuses to write the samples it keeps.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import pyarrow.fs as pafs
from PIL import Image

from clip_ray.config import SourceConfig
from clip_ray.data.formats import (
    DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadSample, FailureCounts, FailureReason, ParquetWriter, Sample, ShardWriter,
    decode_image, list_shards, load_caption_csv, load_coco_captions, load_split, read_shard,
)
from clip_ray.data.formats.folders import samples_from_table
from clip_ray.data.formats.samples import guess_image_ext
from clip_ray.data.offline.selection import Selection
from clip_ray.storage import AtomicFile, basename, join, resolve, under


@dataclass
class ConvertOptions:
    samples_per_shard: int = 1000
    output_format: Literal["tar", "parquet"] = "tar"
    # Decode every image and drop (and count) the ones that do not decode or exceed max_pixels.
    validate_images: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Shrink images whose shorter side is longer than this, re-encoded as JPEG; smaller ones are kept as they are.
    resize: int | None = None
    jpeg_quality: int = 95
    # Partitions converted at once (default: the cluster's CPUs / cpus_per_task).
    num_workers: int | None = None
    cpus_per_task: float = 1.0
    # Redo partitions that a previous run finished with the same fingerprint.
    overwrite: bool = False
    # Fail (after writing stats) when more of the input is bad than this; 1.0 fails only when nothing is usable.
    max_failure_fraction: float = 1.0

    def validate(self) -> None:
        if self.samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {self.samples_per_shard}")
        if self.output_format not in ("tar", "parquet"):
            raise ValueError(f"output_format must be 'tar' or 'parquet', got {self.output_format!r}")
        if self.resize is not None and self.resize <= 0:
            raise ValueError(f"resize must be positive, got {self.resize}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.num_workers is not None and self.num_workers <= 0:
            raise ValueError(f"num_workers must be positive, got {self.num_workers}")

    def output_fields(self) -> dict:
        """The options that decide the bytes written (and so go into the fingerprint)."""
        return {name: getattr(self, name) for name in
                ("samples_per_shard", "output_format", "validate_images", "max_pixels", "resize", "jpeg_quality")}


@dataclass
class Partition:
    """One task's share of the input: an input shard, or a run of images from a caption table."""

    index: int
    shard: str | None = None
    # Caption tables: (image name, [(caption, meta), ...]) in table order, the images folder, the table's path.
    images: list[tuple[str, list]] = field(default_factory=list)
    images_dir: str = ""
    table: str = ""


# --------------------------------------------------------------------------- reading


def plan_partitions(source: SourceConfig, samples_per_partition: int, counts: FailureCounts) -> list[Partition]:
    """The partitions of `source`, in a fixed order; problems found while planning are counted in `counts`."""
    if source.format in ("webdataset", "parquet"):
        extension = ".tar" if source.format == "webdataset" else ".parquet"
        shards = list_shards(source.path, (extension,))
        return [Partition(index=i, shard=shard) for i, shard in enumerate(shards)]
    table_path = under(source.path, source.captions_file)
    try:
        if source.format == "csv":
            table = load_caption_csv(table_path, image_column=source.image_column,
                                     caption_column=source.caption_column)
        else:
            table, orphans = load_coco_captions(table_path)
            for problem in orphans:
                counts.reject(FailureReason.MISSING_IMAGE, table_path, "", problem)
        names = load_split(under(source.path, source.split_file)) if source.split_file else list(table)
    except (OSError, ValueError, KeyError, TypeError, csv.Error) as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, table_path, "", f"{type(err).__name__}: {err}")
        return []
    runs: list[list[tuple[str, list]]] = [[]]
    run_size = 0
    for name in names:
        captions = table.get(name, [])
        size = max(1, len(captions))
        if runs[-1] and run_size + size > samples_per_partition:
            runs.append([])
            run_size = 0
        runs[-1].append((name, captions))
        run_size += size
    images_dir = under(source.path, source.images_dir)
    return [Partition(index=i, images=run, images_dir=images_dir, table=table_path)
            for i, run in enumerate(runs) if run]


def read_partition(partition: Partition, source: SourceConfig, counts: FailureCounts) -> Iterator[Sample]:
    """The usable samples of one partition, in a fixed order (positions in it are stable across runs)."""
    if partition.shard is not None:
        return read_shard(partition.shard, counts, image_column=source.image_column,
                          caption_column=source.caption_column)
    table = {name: captions for name, captions in partition.images}
    names = [name for name, _ in partition.images]
    return samples_from_table(table, names, partition.images_dir, partition.table, counts, None)


# --------------------------------------------------------------------------- images


def shrink(image: Image.Image, shorter_side: int) -> Image.Image | None:
    """The image scaled so its shorter side is `shorter_side`, or None when it is no larger than that."""
    width, height = image.size
    if min(width, height) <= shorter_side:
        return None
    if width <= height:
        size = (shorter_side, round(height * shorter_side / width))
    else:
        size = (round(width * shorter_side / height), shorter_side)
    return image.resize(size, Image.Resampling.LANCZOS)


def _encode(image: Image.Image, fmt: str, **save_options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def prepare_sample(sample: Sample, options: ConvertOptions, counts: FailureCounts) -> Sample | None:
    """The sample with its image validated, shrunk or transcoded as the options ask; None (counted) when bad.

    Without validation or resizing the bytes pass through undecoded, except an
    image in a format shards cannot name (gif, bmp, tiff), which becomes PNG.
    """
    ext = sample.image_ext if sample.image_ext in IMAGE_EXTENSIONS else guess_image_ext(sample.image)
    if not (options.validate_images or options.resize or ext not in IMAGE_EXTENSIONS):
        counts.accept()
        return dataclasses.replace(sample, image_ext=ext)
    try:
        image = decode_image(sample.image, options.max_pixels)
    except BadSample as bad:
        counts.reject(bad.reason, sample.source, sample.key, bad.detail)
        return None
    counts.accept()
    smaller = shrink(image, options.resize) if options.resize else None
    if smaller is not None:
        return dataclasses.replace(sample, image=_encode(smaller, "JPEG", quality=options.jpeg_quality), image_ext="jpg")
    if ext not in IMAGE_EXTENSIONS:
        return dataclasses.replace(sample, image=_encode(image, "PNG"), image_ext="png")
    return dataclasses.replace(sample, image_ext=ext)


# --------------------------------------------------------------------------- writing


class ParquetShardWriter:
    """ShardWriter's interface over Parquet files of `samples_per_shard` rows: `{prefix}{index:05d}.parquet`."""

    def __init__(self, out_dir: str, samples_per_shard: int, prefix: str = ""):
        self.out_dir, self.samples_per_shard, self.prefix = str(out_dir), samples_per_shard, prefix
        self.shards: list[str] = []
        self._writer: ParquetWriter | None = None

    def write(self, key: str, image: bytes, caption: str, image_ext: str = "jpg", meta: dict | None = None) -> None:
        if self._writer is None:
            path = join(self.out_dir, f"{self.prefix}{len(self.shards):05d}.parquet")
            self._writer = ParquetWriter(path, rows_per_group=min(self.samples_per_shard, 1000))
        self._writer.write(key, image, caption, image_ext, meta)
        if self._writer.num_rows == self.samples_per_shard:
            self.shards.append(self._writer.close())
            self._writer = None

    def close(self) -> list[str]:
        if self._writer is not None:
            self.shards.append(self._writer.close())
            self._writer = None
        return list(self.shards)

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _unique_key(key: str, taken: set[str]) -> str:
    """A shard-safe key ('.' would start the extension) not yet used in this partition."""
    directory, slash, base = key.rpartition("/")
    safe = directory + slash + base.replace(".", "_") or "sample"
    unique, n = safe, 1
    while unique in taken:
        unique, n = f"{safe}_dup{n}", n + 1
    taken.add(unique)
    return unique


def convert_partition(
    partition: Partition, source: SourceConfig, options: ConvertOptions, out_dir: str,
    fingerprint: str = "", selection: Selection | None = None,
) -> dict:
    """Writes one partition's shards and its stats file; returns that stats file's content.

    With a `selection` only the samples at its positions are written, each with
    its meta added: how curation writes its choice.
    """
    read_counts, prepare_counts = FailureCounts(), FailureCounts()
    prefix = f"{partition.index:05d}_"
    if options.output_format == "tar":
        writer = ShardWriter(out_dir, options.samples_per_shard, prefix=prefix)
    else:
        writer = ParquetShardWriter(out_dir, options.samples_per_shard, prefix=prefix)
    keys: set[str] = set()
    renamed = 0
    keep = selection.read() if selection is not None else None
    # Curation keeps nothing of many partitions: no need to read them again.
    samples = read_partition(partition, source, read_counts) if keep != {} else iter(())
    try:
        for position, sample in enumerate(samples):
            if keep is not None:
                if position not in keep:
                    continue
                sample.meta = {**sample.meta, **keep[position]}
            sample = prepare_sample(sample, options, prepare_counts)
            if sample is None:
                continue
            key = _unique_key(sample.key, keys)
            renamed += key != sample.key
            writer.write(key, sample.image, sample.caption, sample.image_ext, sample.meta or None)
    except BaseException:
        writer.abort()
        raise
    shards = [basename(path) for path in writer.close()]
    result = {"partition": partition.index, "fingerprint": fingerprint, "samples": prepare_counts.ok,
              "shards": shards, "renamed_keys": renamed,
              "counts": read_counts.followed_by(prepare_counts).to_dict()}
    fs, root = resolve(out_dir)
    write_json(fs, join(root, f"{prefix}stats.json"), result)
    return result


def write_json(fs: pafs.FileSystem, path: str, data: Any) -> None:
    """Stats files appear whole or not at all: a re-run trusts any stats file it finds."""
    with AtomicFile(path, fs) as file:
        file.stream.write(json.dumps(data, indent=2, default=str).encode("ascii"))

