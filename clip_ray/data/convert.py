"""Converts any image-text source into WebDataset tar (or Parquet) shards, in parallel on Ray.

The input is cut into partitions on the driver, deterministically: one input
shard (tar or Parquet file) is one partition; a caption table (CSV or COCO) is
cut into runs of whole images holding at most `samples_per_shard` captions.
Each partition is one Ray task that writes its own shards, named
`{partition:05d}_{part:05d}.tar` (or `.parquet`), so names depend only on the
input and the options, never on which task finished first. A caption-table
partition fits one shard, so its only shard is `..._00000`.

Next to its shards each task leaves `{partition:05d}_stats.json` (img2dataset
style): its counts, its shard names and a fingerprint of everything that
decides its bytes. A re-run skips every partition whose stats file carries the
same fingerprint and whose shards all exist, and redoes the rest; `overwrite`
redoes all of them, byte for byte the same for the same input and options.
Either way the run starts by deleting leftover `.tmp` files and ends by
deleting shards and stats files of this naming scheme that the run did not
produce (say a coarser `samples_per_shard` last time), so the folder never
holds duplicates. Other files in the folder are left alone.

Keys are kept as they were, except that a '.' in one (it would start the
extension) becomes '_' and a key repeated within a partition gets '_dupN';
stats count these as `renamed_keys`.

The run's totals go to `stats.json`: samples and shards written, failures by
reason, duration, and what went in and came out.

Tasks run wherever Ray puts them: on a cluster of several nodes the input and
the output folder must be storage every node sees (a URI or a shared mount).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import pyarrow.fs as pafs
import ray
from PIL import Image

from clip_ray.config import SourceConfig
from clip_ray.data.folders import _samples_from_table as samples_from_table
from clip_ray.data.formats import (
    DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadSample, FailureCounts, FailureReason, ParquetWriter, Sample,
    ShardWriter, check_failure_rate, decode_image, list_shards, load_caption_csv, load_coco_captions, load_split,
    read_shard,
)
from clip_ray.data.samples import guess_image_ext
from clip_ray.data.storage import AtomicFile, basename, join, resolve, under
from clip_ray.ray_utils import cluster_cpus, connect_ray

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^(\d{5,})_(\d{5,})\.(tar|parquet)$")
PARTITION_STATS_NAME = re.compile(r"^(\d{5,})_stats\.json$")
STATS_FILE = "stats.json"


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
    fingerprint: str = "", keep: dict[int, dict] | None = None,
) -> dict:
    """Writes one partition's shards and its stats file; returns that stats file's content.

    With `keep` ({position: meta to add}) only the samples at those positions of
    the partition are written, which is how curation writes its choice.
    """
    read_counts, prepare_counts = FailureCounts(), FailureCounts()
    prefix = f"{partition.index:05d}_"
    if options.output_format == "tar":
        writer = ShardWriter(out_dir, options.samples_per_shard, prefix=prefix)
    else:
        writer = ParquetShardWriter(out_dir, options.samples_per_shard, prefix=prefix)
    keys: set[str] = set()
    renamed = 0
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


# --------------------------------------------------------------------------- driving


def write_json(fs: pafs.FileSystem, path: str, data: Any) -> None:
    with AtomicFile(path, fs) as file:
        file.stream.write(json.dumps(data, indent=2, default=str).encode("ascii"))


def _read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None


def fingerprint(partition: Partition, source: SourceConfig, options: ConvertOptions, keep: dict | None) -> str:
    """A digest of everything that decides a partition's output bytes."""
    payload = {"partition": dataclasses.asdict(partition), "source": dataclasses.asdict(source),
               "options": options.output_fields(), "keep": keep}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _finished_before(fs: pafs.FileSystem, root: str, index: int, digest: str) -> dict | None:
    """The stats of a previous run of this partition, if it was the same work and its shards are all there."""
    previous = _read_json(fs, join(root, f"{index:05d}_stats.json"))
    if not previous or previous.get("fingerprint") != digest:
        return None
    paths = [join(root, name) for name in previous.get("shards", [])]
    if any(info.type != pafs.FileType.File for info in fs.get_file_info(paths)):
        return None
    return previous


def _clean_folder(fs: pafs.FileSystem, root: str, keep_names: set[str] | None) -> int:
    """Deletes this scheme's leftover .tmp files, and (given `keep_names`) its shards and stats not in it."""
    removed = 0
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = basename(info.path)
        stem = name[: -len(".tmp")] if name.endswith(".tmp") else None
        ours = SHARD_NAME.match(stem or name) or PARTITION_STATS_NAME.match(stem or name) or stem == STATS_FILE
        stale = stem is not None or (keep_names is not None and name not in keep_names and name != STATS_FILE)
        if info.is_file and ours and stale:
            fs.delete_file(info.path)
            removed += 1
    return removed


def run_partitions(
    partitions: list[Partition], source: SourceConfig, options: ConvertOptions, out_dir: str,
    keep: dict[int, dict[int, dict]] | None = None,
) -> list[dict]:
    """Converts every partition as a Ray task (skipping finished ones); their stats, in partition order.

    `keep` maps a partition index to the positions to write (see convert_partition);
    a partition missing from it writes nothing.
    """
    fs, root = resolve(out_dir)
    for partition in partitions:
        if partition.shard is not None and resolve(partition.shard)[1].rsplit("/", 1)[0] == root.rstrip("/"):
            raise ValueError(f"{out_dir} holds input shard {partition.shard}: write to another folder")
    fs.create_dir(root, recursive=True)
    _clean_folder(fs, root, keep_names=None)
    results: dict[int, dict] = {}
    todo = []
    for partition in partitions:
        wanted = None if keep is None else keep.get(partition.index, {})
        digest = fingerprint(partition, source, options, wanted)
        previous = None if options.overwrite else _finished_before(fs, root, partition.index, digest)
        if previous is not None:
            results[partition.index] = {**previous, "reused": True}
        else:
            todo.append((partition, source, options, str(out_dir), digest, wanted))
    task = ray.remote(num_cpus=options.cpus_per_task)(convert_partition)
    num_workers = options.num_workers or max(1, int(cluster_cpus() / options.cpus_per_task))
    in_flight: list[ray.ObjectRef] = []
    for args in todo:
        if len(in_flight) >= num_workers:
            done, in_flight = ray.wait(in_flight, num_returns=1)
            _collect(ray.get(done[0]), results, len(todo))
        in_flight.append(task.remote(*args))
    for ref in in_flight:
        _collect(ray.get(ref), results, len(todo))
    produced = {name for result in results.values() for name in result["shards"]}
    produced |= {f"{index:05d}_stats.json" for index in results}
    removed = _clean_folder(fs, root, keep_names=produced)
    if removed:
        log.info("removed %d stale file(s) from %s", removed, out_dir)
    return [results[partition.index] for partition in partitions]


def _collect(result: dict, results: dict[int, dict], total: int) -> None:
    results[result["partition"]] = result
    log.info("partition %05d: %d samples in %d shard(s) (%d/%d partitions done)",
             result["partition"], result["samples"], len(result["shards"]), len(results), total)


def sum_counts(results: list[dict], start: FailureCounts | None = None) -> FailureCounts:
    total = FailureCounts().merge(start) if start is not None else FailureCounts()
    for result in results:
        total.merge(FailureCounts.from_dict(result["counts"]))
    return total


def convert(source: SourceConfig, out_dir: str, options: ConvertOptions | None = None) -> dict:
    """Converts `source` into shards under `out_dir`; returns the run's stats (also written to stats.json).

    Uses the Ray cluster this process is connected to, or connects as
    `connect_ray` does. Raises DataError (after writing the stats) when the input
    gave nothing usable or more than `max_failure_fraction` of it was bad.
    """
    options = options or ConvertOptions()
    options.validate()
    source.validate("source")
    started = time.time()
    connect_ray()
    planning = FailureCounts()
    partitions = plan_partitions(source, options.samples_per_shard, planning)
    results = run_partitions(partitions, source, options, out_dir)
    counts = sum_counts(results, planning)
    shards = sorted(name for result in results for name in result["shards"])
    stats = {
        "samples_written": counts.ok,
        "shards_written": len(shards),
        "failures": dict(sorted(counts.failed.items())),
        "failure_examples": counts.examples,
        "samples_seen": counts.total,
        "renamed_keys": sum(result["renamed_keys"] for result in results),
        "partitions": len(partitions),
        "partitions_reused": sum(bool(result.get("reused")) for result in results),
        "duration_s": round(time.time() - started, 3),
        "input": dataclasses.asdict(source),
        "output": {"dir": str(out_dir), **options.output_fields()},
        "shards": shards,
    }
    fs, root = resolve(out_dir)
    write_json(fs, join(root, STATS_FILE), stats)
    log.info("converted %s -> %s: %s", source.path, out_dir, counts.summary())
    check_failure_rate(counts, options.max_failure_fraction, source.path)
    return stats
