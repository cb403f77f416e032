"""Converts any image-text source into WebDataset tar (or Parquet) shards, in parallel on Ray.

The input is cut into partitions, each converted by one Ray task into shards of
its own; clip_ray.data.offline.partitions says how partitions are cut, named and
written. This module drives a run: it skips what a previous run already did,
schedules the rest, and cleans up.

Each partition's stats file carries a fingerprint of everything that decides
its bytes. A re-run skips every partition whose stats file carries the same
fingerprint and whose shards all exist, and redoes the rest; `overwrite`
redoes all of them, byte for byte the same for the same input and options.
Either way the run starts by deleting leftover `.tmp` files and ends by
deleting shards and stats files of this naming scheme that the run did not
produce (say a coarser `samples_per_shard` last time), so the folder never
holds duplicates. Other files in the folder are left alone.

The run's totals go to `stats.json`: samples and shards written, failures by
reason, duration, and what went in and came out.

Tasks run wherever Ray puts them: on a cluster of several nodes the input and
the output folder must be storage every node sees (a URI or a shared mount).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import time
from typing import Any

import pyarrow.fs as pafs
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import FailureCounts, check_failure_rate
from clip_ray.data.offline.partitions import ConvertOptions, Partition, convert_partition, plan_partitions, write_json
from clip_ray.data.offline.selection import NOTHING, Selection
from clip_ray.ray_session import cluster_cpus, connect_ray
from clip_ray.storage import basename, join, resolve

log = logging.getLogger(__name__)

SHARD_NAME = re.compile(r"^(\d{5,})_(\d{5,})\.(tar|parquet)$")
PARTITION_STATS_NAME = re.compile(r"^(\d{5,})_stats\.json$")
STATS_FILE = "stats.json"

def _read_json(fs: pafs.FileSystem, path: str) -> Any | None:
    try:
        with fs.open_input_stream(path) as stream:
            return json.loads(stream.read())
    except (OSError, ValueError):
        return None


def fingerprint(partition: Partition, source: SourceConfig, options: ConvertOptions,
                selection: Selection | None) -> str:
    """A digest of everything that decides a partition's output bytes."""
    payload = {"partition": dataclasses.asdict(partition), "source": dataclasses.asdict(source),
               "options": options.output_fields(),
               "keep": selection.fingerprint() if selection is not None else None}
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
    selections: dict[int, Selection] | None = None,
) -> list[dict]:
    """Converts every partition as a Ray task (skipping finished ones); their stats, in partition order.

    With `selections` (curation's choice, see clip_ray.data.offline.selection) a
    partition writes only its selected pairs, and one missing from it writes nothing.
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
        wanted = None if selections is None else selections.get(partition.index, NOTHING)
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
