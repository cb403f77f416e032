"""The embedding job (`clip-ray embed`): a data set in, one Parquet file of embeddings per partition out.

    plan (clip_ray.inference.partitions): the input's partitions, numbered
      -> skip every partition whose file a previous run finished with the same fingerprint
    Ray Data, over the rest (clip_ray.inference.pipeline):
      from_items(one row per partition)
      -> map_batches(preprocess_partition)   CPU tasks, any node: read, decode, centre-crop, tokenize;
                                             bad samples skipped and counted (PartitionLedger)
      -> map_batches(ClipEncoder)            an actor pool of `concurrency` actors, each with its CPU/GPU share,
                                             each loading the model once
    the driver: rows grouped by partition; a partition whose rows have all arrived (as many as its
    task reported emitting) is written at once, atomically, as part-NNNNN.parquet
      -> embed_stats.json and a summary: rows, partitions written and reused, failures by reason

Only embeddings and a few strings come back to the driver (a 512-wide float16 row is 1 KiB),
so the driver is not the bottleneck; pixels stay between the two stages in the object store.

Resuming: a file's metadata carries a fingerprint of everything that decides its content (the
model's identity, the towers, dtype and precision, the preprocessing, the input and the
partition). A re-run skips partitions whose file has the same fingerprint and redoes the rest
(`overwrite` redoes all); it starts by deleting leftover temporary files and ends by deleting
part files of partitions the plan no longer has. An interrupted run keeps every file it finished.

Under `ray job submit` this runs on the head node: the input must be readable from every node
(a URI or a shared mount), the output from the driver.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time

import numpy as np
import pyarrow.fs as pafs

from clip_ray.config import EmbedConfig
from clip_ray.data.formats import FailureCounts, check_failure_rate
from clip_ray.inference.embedding_files import (
    FOLDER_COLUMNS, FORMAT, PAIR_COLUMNS, PART_NAME, STATS_FILE, clean_output_folder, embedding_schema, output_path,
    part_name, read_metadata, write_embedding_file,
)
from clip_ray.inference.encoder import EMBEDDING_COLUMNS
from clip_ray.inference.models import ResolvedModel, resolve_model
from clip_ray.inference.partitions import EmbedPartition, plan_embed_partitions
from clip_ray.inference.pipeline import encode_partitions, stacked
from clip_ray.ray_session import connect_ray
from clip_ray.storage import basename, is_uri, join, local_absolute, resolve, write_file

log = logging.getLogger("clip_ray.embed")


def job_identity(config: EmbedConfig, model: ResolvedModel) -> dict:
    """What every file of the job records, and (with its partition) what decides its content."""
    model_config = model.model_config
    return {
        "format": FORMAT,
        "model": model.identity(),
        "towers": list(config.towers),
        "dtype": config.dtype,
        "precision": config.precision,
        "normalized": True,
        "embed_dim": model_config.embed_dim,
        "preprocess": {"image_size": model_config.vision.image_size, "crop": "centre square, bicubic",
                       "max_pixels": config.max_pixels, "context_length": model_config.text.context_length},
        "input": {"source": dataclasses.asdict(config.source) if config.source is not None else None,
                  "image_folder": config.image_folder, "samples_per_partition": config.samples_per_partition},
    }


def _relative(value, root: str):
    """`value` with `root` and every path under it made relative to it (lists and dicts walked)."""
    root = root.rstrip("/")
    if isinstance(value, str):
        if value == root:
            return ""
        return value[len(root) + 1:] if value.startswith(root + "/") else value
    if isinstance(value, (list, tuple)):
        return [_relative(item, root) for item in value]
    if isinstance(value, dict):
        return {key: _relative(item, root) for key, item in value.items()}
    return value


def fingerprint(identity: dict, partition: EmbedPartition, input_root: str) -> str:
    """A digest of what decides a partition's file: the model by its weights (and MLflow model id),
    architecture and tokenizer, never by where they lie; the job's settings; the partition, its
    paths taken relative to the input, so a data set that moved (or a job submitted from another
    working directory) still finds its finished files."""
    model = identity["model"]
    content = {
        "model": {name: model[name] for name in ("config_sha256", "version", "state_dict_options")},
        "tokenizer": model["tokenizer"]["sha256"],
        "job": {name: identity[name] for name in ("format", "towers", "dtype", "precision", "preprocess")},
        "input": _relative(identity["input"], input_root),
        "partition": _relative(dataclasses.asdict(partition), input_root),
    }
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


class _Progress:
    """A line in the job log every `every_s` seconds, and one per written file."""

    def __init__(self, total: int, reused: int, every_s: float):
        self.total, self.done, self.rows, self.failed = total, reused, 0, 0
        self.started = self.last = time.monotonic()
        self.every_s = every_s

    def written(self, name: str, rows: int, counts: FailureCounts) -> None:
        self.done += 1
        self.rows += rows
        self.failed += counts.num_failed
        log.info("%s: %d rows%s (%d/%d partitions done)", name, rows,
                 f", {counts.num_failed} skipped ({counts.summary()})" if counts.num_failed else "",
                 self.done, self.total)

    def tick(self, rows_seen: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = (self.rows + rows_seen) / max(now - self.started, 1e-9)
            log.info("embedding: %d rows embedded (%.1f rows/s), %d/%d partitions done, %d samples skipped",
                     self.rows + rows_seen, rate, self.done, self.total, self.failed)


def finished_partitions(out_dir: str, digests: dict[int, str]) -> tuple[dict[int, FailureCounts], int]:
    """({index: its counts} of the partitions whose file in `out_dir` carries the fingerprint
    `digests` gives them, the number of files found with another fingerprint): what a re-run skips,
    and how many finished files it will redo. One listing, then one footer read per file found."""
    fs, root = resolve(out_dir)
    listing = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    present = {basename(info.path) for info in listing if info.is_file and PART_NAME.match(basename(info.path))}
    finished, other = {}, 0
    for index, digest in digests.items():
        if part_name(index) not in present:
            continue
        metadata = read_metadata(join(out_dir, part_name(index)))
        if metadata is not None and metadata.get("fingerprint") == digest:
            finished[index] = FailureCounts.from_dict(metadata.get("counts", {}))
        else:
            other += 1
    return finished, other


def _absolute_paths(config: EmbedConfig) -> EmbedConfig:
    """A copy with local input and output paths made absolute (the tasks run in other directories)."""
    config = copy.deepcopy(config)
    if config.source is not None:
        config.source.path = local_absolute(config.source.path)
    if config.image_folder:
        config.image_folder = local_absolute(config.image_folder)
    config.output = local_absolute(config.output) if config.output else config.output
    return config


def _input_root(config: EmbedConfig) -> str:
    """The folder the input's paths are relative to: the source's folder (a pattern's folder), or the ImageFolder."""
    path = config.source.path if config.source is not None else config.image_folder
    if config.source is not None and config.source.format in ("webdataset", "parquet"):
        wildcard = min((i for i, char in enumerate(path) if char in "*?[{"), default=None)
        path = path if wildcard is None else path[:wildcard].rpartition("/")[0]
        fs, inner = resolve(path)
        if fs.get_file_info(inner).type == pafs.FileType.File:
            path = path.rpartition("/")[0]
    return resolve(path)[1] if not is_uri(path) else path


def _write_partition(config: EmbedConfig, identity: dict, partition: EmbedPartition, digest: str,
                     columns: dict[str, np.ndarray], counts: FailureCounts, text_columns: tuple[str, ...]) -> int:
    embeddings = tuple(EMBEDDING_COLUMNS[tower] for tower in config.towers)
    metadata = {**identity, "partition": {"index": partition.index, "input": partition.describe()},
                "fingerprint": digest, "counts": counts.to_dict(), "rows": counts.ok}
    schema = embedding_schema(text_columns, embeddings, identity["embed_dim"], config.dtype, metadata)
    values = {name: [value or None for value in columns[name].tolist()] for name in text_columns}  # "" -> null
    for name in embeddings:
        values[name] = stacked(columns[name], identity["embed_dim"])
    return write_embedding_file(output_path(config.output, partition.index), schema, values)


def embed(config: EmbedConfig, model: ResolvedModel | None = None) -> dict:
    """Runs the job on the connected Ray cluster (or one `connect_ray` starts); returns its summary,
    also written to OUTPUT/embed_stats.json. Raises DataError (after writing the summary) when the
    input gave nothing usable or more than `max_failure_fraction` of it was bad."""
    config = _absolute_paths(config)
    config.validate()
    started = time.time()
    model = model or resolve_model(config.model, config.tokenizer, config.tracking_uri, config.state_dict_activation)
    connect_ray()
    identity = job_identity(config, model)
    text_columns = PAIR_COLUMNS if config.source is not None else FOLDER_COLUMNS
    planning = FailureCounts()
    partitions = plan_embed_partitions(config, planning)
    by_index = {partition.index: partition for partition in partitions}
    input_root = _input_root(config)
    digests = {partition.index: fingerprint(identity, partition, input_root) for partition in partitions}

    fs, root = resolve(config.output)
    fs.create_dir(root, recursive=True)
    clean_output_folder(config.output, keep=None)
    finished, redone = ({}, 0) if config.overwrite else finished_partitions(config.output, digests)
    todo = [partition for partition in partitions if partition.index not in finished]
    log.info("embedding %s with %s (%s): %d partitions, %d finished before, %d to do -> %s",
             config.source.path if config.source is not None else config.image_folder, model.location,
             "+".join(config.towers), len(partitions), len(finished), len(todo), config.output)
    if redone:
        log.warning("%d finished partition file(s) came from another model or other settings: redoing them", redone)

    progress = _Progress(len(partitions), len(finished), config.progress_every_s)
    written: dict[int, FailureCounts] = {}
    for index, columns, counts in encode_partitions(todo, model, config, source=config.source, towers=config.towers,
                                                    columns=text_columns, tick=progress.tick):
        rows = _write_partition(config, identity, by_index[index], digests[index], columns, counts, text_columns)
        written[index] = counts
        progress.written(part_name(index), rows, counts)
    removed = clean_output_folder(config.output, keep={part_name(p.index) for p in partitions})
    if removed:
        log.info("removed %d part file(s) of partitions the input no longer has", removed)

    counts = FailureCounts().merge(planning)
    for partition_counts in [*finished.values(), *written.values()]:
        counts.merge(partition_counts)
    duration = time.time() - started
    new_rows = sum(c.ok for c in written.values())
    summary = {
        "rows_written": counts.ok,
        "rows_embedded_now": new_rows,
        "partitions": len(partitions),
        "partitions_written": len(written),
        "partitions_reused": len(finished),
        "samples_seen": counts.total,
        "failures": dict(sorted(counts.failed.items())),
        "failure_examples": counts.examples,
        "duration_s": round(duration, 3),
        "rows_per_s": round(new_rows / duration, 1) if duration > 0 else None,
        "towers": list(config.towers),
        "dtype": config.dtype,
        "model": identity["model"],
        "output": str(config.output),
        "files": [part_name(p.index) for p in partitions],
    }
    write_file(join(config.output, STATS_FILE), json.dumps(summary, indent=2, default=str).encode())
    log.info("embedded %s -> %s: %s", config.model, config.output, counts.summary())
    check_failure_rate(counts, config.max_failure_fraction,
                       config.source.path if config.source is not None else config.image_folder)
    return summary
