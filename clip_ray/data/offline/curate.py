"""CLIP-style curation as a two-pass Ray Data job.

CLIP's 400M pairs were the web pairs whose text contains one of 500,000
queries, balanced to at most 20,000 pairs per query. This does the same to any
source clip-ray reads, plus MetaCLIP's balancing, evaluation-overlap removal,
exact-duplicate image removal, caption length filters and, optionally, a score
filter (DataComp's CLIP-score baseline: the scorer is given by the caller, see
clip_ray.data.offline.score_filter). Query matching (clip_ray.data.offline.matching)
is optional when a score filter is given. Every input pair ends with exactly one
fate; the first that applies:

1. a bad sample (the reader's or the image decoder's reason, e.g. corrupt_image;
   also an image that first fails to decode while being scored, and
   unreadable_shard for a pair the scorer's re-read no longer finds);
2. too_short / too_long: fewer than min_words / min_chars or more than
   max_words / max_chars (words are whitespace-separated, chars are counted
   after stripping);
3. no_query_match: no query occurs in the caption (only with queries);
4. eval_overlap: the image's bytes equal an image of an `exclude_images`
   evaluation set, or (given a near-duplicate filter) its embedding is within a
   cosine threshold of one (clip_ray.data.offline.overlap);
5. low_clip_score: the pair's score is below the threshold, or outside the
   top fraction of the pairs scored (only with a score filter; only pairs that
   got this far are scored, since the model is the expensive step);
6. duplicate_image: the same image bytes (sha256) as a pair earlier in the
   input order (partition, then position in it) that also got this far;
7. over_cap: the balance did not keep it (only with queries; `balance` is
   "rarest", CLIP's per-query cap, or "metaclip", MetaCLIP's per-query
   sampling, both with t = `max_per_query`: clip_ray.data.offline.balance);
8. kept.

A query's matched count is the number of pairs that match it after steps 1-4.

Pass one reads every partition (as `convert` partitions it) in parallel and
emits one small row per pair: position, fate so far, matched query ids, image
hash (clip_ray.data.offline.pair_rows). Steps 4-7 work on those rows in Ray
Data: joins and groupbys by image hash, by partition and by query, each a
hash shuffle then one vectorised call per block. The kept rows
are written per partition to storage (clip_ray.data.offline.selection), and pass
two re-reads the partitions, each task with its own partition's selection, and
writes the kept samples with `convert`'s writer, so the output folder follows its
naming and re-run rules. No per-pair data passes through the driver: it holds
per-query counts, one row per partition and the report. Each kept sample's meta
gains "query" (with queries) and "clip_score" (with a score filter).

The report (report.json) has every fate's count, per-query counts ("matched";
"kept", the pairs kept on the query's own account; "kept_containing", the kept
pairs whose caption contains it), the evaluation sets' hashing counts and, with a
score filter, the scorer's identity, the score quantiles of the pairs scored and
the score at a top-fraction cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import DEFAULT_MAX_PIXELS, BadSample, DataError, FailureCounts, Sample, decode_image
from clip_ray.data.offline.balance import BALANCE_MODES, BalanceMode, balance
from clip_ray.data.offline.convert import run_partitions, sum_counts
from clip_ray.data.offline.matching import QueryMatcher
from clip_ray.data.offline.overlap import (
    EvalImages, NearDuplicateFilter, hash_eval_images, mark_near_duplicates, mark_overlap,
)
from clip_ray.data.offline.pair_rows import (
    DUPLICATE_IMAGE, EVAL_OVERLAP, KEPT, NO_QUERY_MATCH, OVER_CAP, SCAN_SCHEMA, TOO_LONG, TOO_SHORT, count_fates,
    in_whole_groups, order_in_groups, pairs_per_query, set_drop, still_in,
)
from clip_ray.data.offline.partitions import ConvertOptions, Partition, plan_partitions, read_partition, write_json
from clip_ray.data.offline.score_filter import LOW_CLIP_SCORE, ScoreFilter, filter_by_score, scored_report
from clip_ray.data.offline.selection import remove_selections, write_selections
from clip_ray.ray_session import connect_ray
from clip_ray.storage import join, resolve

REPORT_FILE = "report.json"
# Rows per shuffle partition of the global steps; a few hundred thousand small rows is a cheap block.
ROWS_PER_SHUFFLE_PARTITION = 500_000


@dataclass
class CurateOptions:
    # The balance's t: at most this many pairs per query (rarest), or MetaCLIP's threshold (metaclip).
    max_per_query: int = 20_000
    balance: BalanceMode = "rarest"
    seed: int = 0
    min_words: int = 0
    max_words: int | None = None
    min_chars: int = 0
    max_chars: int | None = None
    dedup_images: bool = True
    # Evaluation sets whose images must not be trained on.
    exclude_images: list[EvalImages] = field(default_factory=list)
    validate_images: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    # Output, as for convert.
    samples_per_shard: int = 1000
    output_format: Literal["tar", "parquet"] = "tar"
    num_workers: int | None = None
    cpus_per_task: float = 1.0
    overwrite: bool = False

    def validate(self) -> None:
        if self.max_per_query <= 0:
            raise ValueError(f"max_per_query must be positive, got {self.max_per_query}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {self.balance!r}")
        for low, high, what in ((self.min_words, self.max_words, "words"), (self.min_chars, self.max_chars, "chars")):
            if low < 0 or (high is not None and high < low):
                raise ValueError(f"caption {what} filter [{low}, {high}] is empty or negative")
        for images in self.exclude_images:
            images.validate()
        self.write_options().validate()

    def write_options(self) -> ConvertOptions:
        """Pass two writes what pass one judged; images were validated there."""
        return ConvertOptions(samples_per_shard=self.samples_per_shard, output_format=self.output_format,
                              validate_images=False, max_pixels=self.max_pixels, num_workers=self.num_workers,
                              cpus_per_task=self.cpus_per_task, overwrite=self.overwrite)


# --------------------------------------------------------------------------- pass one: per pair


def judge(sample: Sample, options: CurateOptions, matcher: QueryMatcher) -> tuple[str, list[int]]:
    """(fate so far, matched query ids) from what one pair alone decides: steps 1-3."""
    if options.validate_images:
        try:
            decode_image(sample.image, options.max_pixels)
        except BadSample as bad:
            return bad.reason.value, []
    words, chars = len(sample.caption.split()), len(sample.caption)
    if words < options.min_words or chars < options.min_chars:
        return TOO_SHORT, []
    if (options.max_words is not None and words > options.max_words) or \
            (options.max_chars is not None and chars > options.max_chars):
        return TOO_LONG, []
    if not len(matcher):  # no queries: the caption filters are the last step here
        return KEPT, []
    queries = matcher.match(sample.caption)
    return (KEPT, queries) if queries else (NO_QUERY_MATCH, [])


def _row(partition: int, position: int, drop: str, queries: list[int], image_hash: bytes) -> dict:
    return {"partition": partition, "position": position, "drop": drop, "queries": queries,
            "image_hash": image_hash, "query": -1, "score": None, "kept_for": []}


def scan_partition(partition: Partition, source: SourceConfig, options: CurateOptions,
                   matcher: QueryMatcher) -> list[dict]:
    """One SCAN_SCHEMA row per pair of the partition, pairs the reader dropped included."""
    read_counts = FailureCounts()
    rows = []
    for position, sample in enumerate(read_partition(partition, source, read_counts)):
        drop, queries = judge(sample, options, matcher)
        digest = hashlib.sha256(sample.image).digest() if drop == KEPT else b""
        rows.append(_row(partition.index, position, drop, queries, digest))
    for reason, n in sorted(read_counts.failed.items()):
        rows.extend(_row(partition.index, -1, reason, [], b"") for _ in range(n))
    return rows


def _scan_batch(batch: pa.Table, source: SourceConfig, options: CurateOptions, matcher: QueryMatcher) -> pa.Table:
    rows = []
    for text in batch.column("partition").to_pylist():
        rows.extend(scan_partition(Partition(**json.loads(text)), source, options, matcher))
    return pa.Table.from_pylist(rows, schema=SCAN_SCHEMA)


# --------------------------------------------------------------------------- the global steps


def shuffle_partitions(num_rows: int) -> int:
    return max(1, min(200, math.ceil(num_rows / ROWS_PER_SHUFFLE_PARTITION)))


def _mark_duplicates(block: pa.Table) -> pa.Table:
    """Whole groups of pairs with one image hash: in each, the first in input order stays, the rest are
    duplicates."""
    block, place = order_in_groups(block, "image_hash", ["partition", "position"])
    return set_drop(block, np.where(place == 0, KEPT, DUPLICATE_IMAGE).tolist())


@dataclass
class Decisions:
    """What the global steps decided: the balanced rows, and the counts the report needs (all O(queries))."""

    decided: ray.data.Dataset
    matched: list[int]
    dropped: dict[str, int] = field(default_factory=dict)
    score_report: dict | None = None
    overlap_report: dict | None = None


def _drop_step(rows: ray.data.Dataset, decisions: Decisions) -> tuple[ray.data.Dataset, dict[str, int]]:
    """(the rows still in after a step, {fate: pairs} it dropped), its drops added to the decisions' counts."""
    rows = rows.materialize()
    fates = {fate: n for fate, n in count_fates(rows).items() if fate != KEPT}
    for fate, n in fates.items():
        decisions.dropped[fate] = decisions.dropped.get(fate, 0) + n
    return still_in(rows).materialize(), fates


def decide(scan: ray.data.Dataset, options: CurateOptions, num_queries: int,
           score_filter: ScoreFilter | None = None, partitions: list[Partition] | None = None,
           source: SourceConfig | None = None, near_duplicates: NearDuplicateFilter | None = None) -> Decisions:
    """Steps 4-7 over pass one's rows."""
    candidates = still_in(scan).materialize()
    num_partitions = shuffle_partitions(candidates.count())
    decisions = Decisions(decided=candidates, matched=[0] * num_queries)
    if options.exclude_images:
        eval_hashes, decisions.overlap_report = hash_eval_images(options.exclude_images, options.cpus_per_task)
        candidates, fates = _drop_step(mark_overlap(candidates, eval_hashes, num_partitions), decisions)
        decisions.overlap_report["exact"] = fates.get(EVAL_OVERLAP, 0)
    if near_duplicates is not None and candidates.count():
        marked = mark_near_duplicates(candidates, near_duplicates, partitions, source, num_partitions)
        candidates, fates = _drop_step(marked, decisions)
        decisions.overlap_report["near_duplicates"] = {"threshold": near_duplicates.threshold,
                                                       **near_duplicates.about, "dropped": fates.get(EVAL_OVERLAP, 0)}
    decisions.matched = pairs_per_query(candidates, "queries", num_queries, num_partitions)
    if score_filter is not None:
        if candidates.count():
            judged, decisions.score_report = filter_by_score(candidates, score_filter, partitions, source,
                                                             num_partitions)
            candidates, _ = _drop_step(judged, decisions)
        else:
            decisions.score_report = scored_report(score_filter, 0)
    if options.dedup_images and candidates.count():
        marked = in_whole_groups(candidates, "image_hash", _mark_duplicates, num_partitions)
        candidates, _ = _drop_step(marked, decisions)
    if num_queries and candidates.count():
        candidates = balance(candidates, options.balance, decisions.matched, options.max_per_query, options.seed,
                             num_partitions).materialize()
    decisions.decided = candidates
    return decisions


# --------------------------------------------------------------------------- the job


def _dropped(planning: FailureCounts, scan: ray.data.Dataset, decisions: Decisions, options: CurateOptions,
             num_queries: int, scored: bool) -> dict[str, int]:
    """Every fate but kept, with 0 for a step that ran and dropped nothing."""
    dropped = dict(planning.failed)
    for fates in (count_fates(scan), decisions.dropped, count_fates(decisions.decided)):
        for reason, n in fates.items():
            if reason != KEPT:
                dropped[reason] = dropped.get(reason, 0) + n
    steps_run = {NO_QUERY_MATCH: num_queries, EVAL_OVERLAP: options.exclude_images, LOW_CLIP_SCORE: scored,
                 DUPLICATE_IMAGE: options.dedup_images, OVER_CAP: num_queries}
    for fate, ran in steps_run.items():
        if ran:
            dropped.setdefault(fate, 0)
    return dict(sorted(dropped.items()))


def curate(source: SourceConfig, queries_file: str | None, out_dir: str, options: CurateOptions | None = None,
           score_filter: ScoreFilter | None = None, near_duplicates: NearDuplicateFilter | None = None) -> dict:
    """Curates `source` against the queries in `queries_file` and/or by `score_filter` into shards under
    `out_dir`; returns the report. `near_duplicates` also drops near copies of the `exclude_images` sets.

    Uses the Ray cluster this process is connected to, or connects as `connect_ray` does.
    """
    options = options or CurateOptions()
    options.validate()
    source.validate("source")
    if queries_file is None and score_filter is None:
        raise ValueError("curation needs a queries file, a score filter, or both")
    if score_filter is not None:
        score_filter.validate()
    if near_duplicates is not None:
        near_duplicates.validate()
        if not options.exclude_images:
            raise ValueError("a near-duplicate filter compares with the exclude_images sets: give at least one")
    started = time.time()
    connect_ray()
    matcher = QueryMatcher.from_file(queries_file) if queries_file is not None else QueryMatcher([])
    if queries_file is not None and not len(matcher):
        raise ValueError(f"{queries_file}: no queries")
    planning = FailureCounts()
    partitions = plan_partitions(source, options.samples_per_shard, planning)
    if not partitions:
        raise DataError(f"data source {source.path!r} has nothing to curate ({planning.summary()})")
    items = [{"partition": json.dumps(dataclasses.asdict(p))} for p in partitions]
    scan = (ray.data.from_items(items, override_num_blocks=len(items))
            .map_batches(_scan_batch, batch_size=1, batch_format="pyarrow", num_cpus=options.cpus_per_task,
                         concurrency=options.num_workers,
                         fn_kwargs={"source": source, "options": options, "matcher": matcher})
            .materialize())
    decisions = decide(scan, options, len(matcher), score_filter, partitions, source, near_duplicates)
    kept_rows = still_in(decisions.decided).materialize()
    num_partitions = shuffle_partitions(kept_rows.count())
    kept_for = pairs_per_query(kept_rows, "kept_for", len(matcher), num_partitions)
    containing = pairs_per_query(kept_rows, "queries", len(matcher), num_partitions)
    selections = write_selections(kept_rows, out_dir, matcher.names, max(num_partitions, min(len(partitions), 200)))

    results = run_partitions(partitions, source, options.write_options(), out_dir, selections=selections)
    remove_selections(out_dir)
    matched = decisions.matched
    report = {
        "pairs_seen": scan.count() + planning.num_failed,
        "kept": sum(selection.count for selection in selections.values()),
        "dropped": _dropped(planning, scan, decisions, options, len(matcher), score_filter is not None),
        "queries": {matcher.names[q]: {"matched": matched[q], "kept": kept_for[q], "kept_containing": containing[q]}
                    for q in range(len(matcher)) if matched[q]},
        "num_queries": len(matcher),
        "queries_matched": sum(n > 0 for n in matched),
        "balance": options.balance if len(matcher) else None,
        "clip_score": decisions.score_report,
        "eval_overlap": decisions.overlap_report,
        "samples_written": sum_counts(results).ok,
        "shards": sorted(name for result in results for name in result["shards"]),
        "partitions": len(partitions),
        "partitions_reused": sum(bool(result.get("reused")) for result in results),
        "duration_s": round(time.time() - started, 3),
        "input": dataclasses.asdict(source),
        "queries_file": str(queries_file) if queries_file is not None else None,
        "options": dataclasses.asdict(options),
        "output": {"dir": str(out_dir)},
    }
    fs, root = resolve(out_dir)
    write_json(fs, join(root, REPORT_FILE), report)
    return report
