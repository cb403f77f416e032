"""CLIP-style curation as a two-pass Ray Data job.

CLIP's 400M pairs were the web pairs whose text contains one of 500,000
queries, balanced to at most 20,000 pairs per query. This does the same to any
source clip-ray reads, plus exact-duplicate image removal, caption length
filters and, optionally, a score filter (DataComp's CLIP-score baseline: the
scorer is given by the caller, see clip_ray.data.offline.score_filter). Query
matching is optional when a score filter is given. Every input pair ends with
exactly one fate; the first that applies:

1. a bad sample (the reader's or the image decoder's reason, e.g. corrupt_image;
   also an image that first fails to decode while being scored, and
   unreadable_shard for a pair the scorer's re-read no longer finds);
2. too_short / too_long: fewer than min_words / min_chars or more than
   max_words / max_chars (words are whitespace-separated, chars are counted
   after stripping);
3. no_query_match: no query occurs in the caption (only with queries);
4. low_clip_score: the pair's score is below the threshold, or outside the
   top fraction of the pairs scored (only with a score filter; only pairs that
   got this far are scored, since the model is the expensive step);
5. duplicate_image: the same image bytes (sha256) as a pair earlier in the
   input order (partition, then position in it) that also got this far;
6. over_cap: see below (only with queries);
7. kept.

Matching is by whole tokens: caption and queries are casefolded and split into
words (`\\w+`) and single punctuation marks, and a query matches where its token
sequence occurs in the caption's. So "cat" does not match "category", "red car"
matches "a Red  car." but not "red, car", and "dog" matches "dog's". Each
caption is cut into its token n-grams up to the longest query's length and the
n-grams are looked up in a dict, so the cost per caption does not grow with
the number of queries.

A pair matching several queries counts toward its rarest one: the query with
the fewest matched pairs (after steps 1-3, before the score filter and dedup),
ties to the query listed first. Rare queries are where balancing matters, and
the choice is a per-pair function of global counts, so it runs in parallel.
Within a query, the pairs kept are the `max_per_query` with the smallest
sha256(seed/partition/position) among those that passed steps 4-5: a seeded
random sample, the same for any number of workers.

Pass one reads every partition (as `convert` partitions it) in parallel and
emits one small row per pair: position, key, fate so far, matched query ids,
image hash. The score filter, dedup and the cap work on those rows (the scores
are joined to them; dedup and the cap are groupbys by image hash and by
assigned query). The driver then collects the kept (partition, position)
pairs, and pass two re-reads the partitions and writes the kept samples with
`convert`'s writer, so the output folder follows its naming and re-run rules;
each kept sample's meta gains "query" (with queries) and "clip_score" (with a
score filter). The report (report.json) has per-query matched and kept counts,
every fate's count and, with a score filter, the scorer's identity, the score
quantiles of the pairs scored and the score at a top-fraction cut.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from typing import Iterable, Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import DEFAULT_MAX_PIXELS, BadSample, DataError, FailureCounts, Sample, decode_image
from clip_ray.data.offline.convert import run_partitions, sum_counts
from clip_ray.data.offline.partitions import ConvertOptions, Partition, plan_partitions, read_partition, write_json
from clip_ray.data.offline.score_filter import LOW_CLIP_SCORE, ScoreFilter, filter_by_score, scored_report
from clip_ray.ray_session import connect_ray
from clip_ray.storage import join, resolve

KEPT = ""
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NO_QUERY_MATCH = "no_query_match"
DUPLICATE_IMAGE = "duplicate_image"
OVER_CAP = "over_cap"
REPORT_FILE = "report.json"

# One row per input pair (position -1: a pair the reader could not even yield).
SCAN_SCHEMA = pa.schema([
    ("partition", pa.int32()), ("position", pa.int32()), ("drop", pa.string()),
    ("queries", pa.list_(pa.int32())), ("image_hash", pa.binary()), ("query", pa.int32()), ("score", pa.float32()),
])
# Rows per shuffle partition of the global steps; a few hundred thousand small rows is a cheap block.
ROWS_PER_SHUFFLE_PARTITION = 500_000

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


class QueryMatcher:
    """Finds which of many queries occur in a caption, by n-gram lookup (see the module docstring)."""

    def __init__(self, queries: Iterable[str]):
        self.names: list[str] = []  # as first written, one per distinct token sequence
        self._ids: dict[str, int] = {}
        self.max_tokens = 0
        for query in queries:
            tokens = tokenize(query)
            phrase = " ".join(tokens)
            if tokens and phrase not in self._ids:
                self._ids[phrase] = len(self.names)
                self.names.append(query.strip())
                self.max_tokens = max(self.max_tokens, len(tokens))

    @classmethod
    def from_file(cls, path: str) -> "QueryMatcher":
        """One query per line; blank lines and repeats are ignored."""
        fs, inner = resolve(path)
        with fs.open_input_stream(inner) as stream:
            return cls(stream.read().decode("utf-8-sig").splitlines())

    def __len__(self) -> int:
        return len(self.names)

    def match(self, caption: str) -> list[int]:
        """Ids (indices into `names`) of the queries that occur in `caption`, ascending."""
        tokens = tokenize(caption)
        found = set()
        for start in range(len(tokens)):
            for end in range(start + 1, min(start + self.max_tokens, len(tokens)) + 1):
                query = self._ids.get(" ".join(tokens[start:end]))
                if query is not None:
                    found.add(query)
        return sorted(found)


@dataclass
class CurateOptions:
    # CLIP's balance: at most this many pairs per query.
    max_per_query: int = 20_000
    seed: int = 0
    min_words: int = 0
    max_words: int | None = None
    min_chars: int = 0
    max_chars: int | None = None
    dedup_images: bool = True
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
        for low, high, what in ((self.min_words, self.max_words, "words"), (self.min_chars, self.max_chars, "chars")):
            if low < 0 or (high is not None and high < low):
                raise ValueError(f"caption {what} filter [{low}, {high}] is empty or negative")
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


def scan_partition(partition: Partition, source: SourceConfig, options: CurateOptions,
                   matcher: QueryMatcher) -> list[dict]:
    """One SCAN_SCHEMA row per pair of the partition, pairs the reader dropped included."""
    read_counts = FailureCounts()
    rows = []
    for position, sample in enumerate(read_partition(partition, source, read_counts)):
        drop, queries = judge(sample, options, matcher)
        digest = hashlib.sha256(sample.image).digest() if drop == KEPT else b""
        rows.append({"partition": partition.index, "position": position, "drop": drop, "queries": queries,
                     "image_hash": digest, "query": -1, "score": None})
    for reason, n in sorted(read_counts.failed.items()):
        rows.extend({"partition": partition.index, "position": -1, "drop": reason, "queries": [],
                     "image_hash": b"", "query": -1, "score": None} for _ in range(n))
    return rows


def _scan_batch(batch: pa.Table, source: SourceConfig, options: CurateOptions, matcher: QueryMatcher) -> pa.Table:
    rows = []
    for text in batch.column("partition").to_pylist():
        rows.extend(scan_partition(Partition(**json.loads(text)), source, options, matcher))
    return pa.Table.from_pylist(rows, schema=SCAN_SCHEMA)


# --------------------------------------------------------------------------- the global steps


def _with_fate(batch: pa.Table, kept: bool) -> pa.Table:
    """The rows still in the running (kept=True) or the ones already dropped."""
    still_in = pc.equal(batch["drop"], KEPT)
    return batch.filter(still_in if kept else pc.invert(still_in))


def _one_row_per_match(batch: pa.Table) -> pa.Table:
    return pa.table({"query": pc.list_flatten(batch["queries"])})


def _group_size(group: pa.Table) -> pa.Table:
    return pa.table({"query": group["query"].slice(0, 1), "pairs": [group.num_rows]})


def _in_input_order(group: pa.Table) -> pa.Table:
    return group.take(pc.sort_indices(group, [("partition", "ascending"), ("position", "ascending")]))


def _set_drop(group: pa.Table, fates: list[str]) -> pa.Table:
    return group.set_column(group.schema.get_field_index("drop"), "drop", pa.array(fates, pa.string()))


def _mark_duplicates(group: pa.Table) -> pa.Table:
    """All pairs with one image hash: the first in input order stays, the rest are duplicates."""
    group = _in_input_order(group)
    return _set_drop(group, [KEPT] + [DUPLICATE_IMAGE] * (group.num_rows - 1))


def _assign_rarest(batch: pa.Table, matched: list[int]) -> pa.Table:
    assigned = [min(ids, key=lambda q: (matched[q], q)) for ids in batch["queries"].to_pylist()]
    return batch.set_column(batch.schema.get_field_index("query"), "query", pa.array(assigned, pa.int32()))


def cap_rank(seed: int, partition: int, position: int) -> int:
    """The seeded pseudo-random order in which a query's pairs are kept (smallest first)."""
    digest = hashlib.sha256(f"{seed}/{partition}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _apply_cap(group: pa.Table, cap: int, seed: int) -> pa.Table:
    """All pairs assigned to one query: the `cap` of lowest rank stay, the rest are over the cap."""
    group = _in_input_order(group)
    places = zip(group["partition"].to_pylist(), group["position"].to_pylist())
    ranks = [cap_rank(seed, partition, position) for partition, position in places]
    kept = set(sorted(range(group.num_rows), key=ranks.__getitem__)[:cap])
    return _set_drop(group, [KEPT if i in kept else OVER_CAP for i in range(group.num_rows)])


def _fates_in_block(batch: pa.Table) -> pa.Table:
    fates = pc.value_counts(batch["drop"])
    return pa.table({"drop": fates.field("values"), "count": fates.field("counts")})


def count_fates(dataset: ray.data.Dataset) -> dict[str, int]:
    """{fate: pairs}, summed on the driver from per-block counts (a dozen rows per block at most)."""
    totals: dict[str, int] = {}
    for row in dataset.map_batches(_fates_in_block, batch_size=None, batch_format="pyarrow").take_all():
        totals[row["drop"]] = totals.get(row["drop"], 0) + row["count"]
    return totals


def decide(scan: ray.data.Dataset, options: CurateOptions, num_queries: int,
           score_filter: ScoreFilter | None = None, partitions: list[Partition] | None = None,
           source: SourceConfig | None = None) -> tuple[ray.data.Dataset, list[int], dict[str, int], dict | None]:
    """Steps 4-6 over pass one's rows: (the rows that reached the cap with their final fate and query, matched
    counts, {fate: pairs} dropped by the score filter and dedup, the score filter's report or None)."""
    num_rows = scan.count()
    shuffle_partitions = max(1, min(200, math.ceil(num_rows / ROWS_PER_SHUFFLE_PARTITION)))
    candidates = scan.map_batches(_with_fate, fn_kwargs={"kept": True}, batch_format="pyarrow").materialize()
    matched = [0] * num_queries
    dropped: dict[str, int] = {}
    score_report = scored_report(score_filter, 0) if score_filter is not None else None
    still_in = candidates.count()
    if not still_in:
        return candidates, matched, dropped, score_report
    if num_queries:
        matches = candidates.map_batches(_one_row_per_match, batch_format="pyarrow")
        per_query = matches.groupby("query", num_partitions=shuffle_partitions).map_groups(
            _group_size, batch_format="pyarrow")
        for row in per_query.take_all():
            matched[row["query"]] = row["pairs"]
    if score_filter is not None:
        judged, score_report = filter_by_score(candidates, score_filter, partitions, source, shuffle_partitions)
        fates = count_fates(judged)
        dropped.update((fate, n) for fate, n in fates.items() if fate != KEPT)
        candidates = judged.map_batches(_with_fate, fn_kwargs={"kept": True}, batch_format="pyarrow")
        still_in = fates.get(KEPT, 0)
    if not still_in:
        return candidates, matched, dropped, score_report
    survivors = candidates
    if options.dedup_images:
        survivors = (candidates.groupby("image_hash", num_partitions=shuffle_partitions)
                     .map_groups(_mark_duplicates, batch_format="pyarrow")
                     .map_batches(_with_fate, fn_kwargs={"kept": True}, batch_format="pyarrow")).materialize()
        dropped[DUPLICATE_IMAGE] = still_in - survivors.count()
    if not num_queries:
        return survivors, matched, dropped, score_report
    decided = (survivors.map_batches(_assign_rarest, fn_kwargs={"matched": matched}, batch_format="pyarrow")
               .groupby("query", num_partitions=shuffle_partitions)
               .map_groups(_apply_cap, fn_kwargs={"cap": options.max_per_query, "seed": options.seed},
                           batch_format="pyarrow"))
    return decided.materialize(), matched, dropped, score_report


def kept_positions(decided: ray.data.Dataset, names: list[str]) -> tuple[dict[int, dict[int, dict]], list[int]]:
    """({partition: {position: meta to add}}, kept pairs per query id), streamed to the driver in batches.

    This is the one place the driver holds per-pair data: a dict entry per kept
    pair (without scores the meta dicts are shared, one per query).
    """
    keep: dict[int, dict[int, dict]] = {}
    kept_per_query = [0] * len(names)
    meta = [{"query": name} for name in names] + [{}]  # [-1]: no query
    kept = decided.map_batches(_with_fate, fn_kwargs={"kept": True}, batch_format="pyarrow")
    columns = ["partition", "position", "query", "score"]
    for batch in kept.select_columns(columns).iter_batches(batch_format="pyarrow"):
        for partition, position, query, score in zip(*(batch[name].to_pylist() for name in columns)):
            keep.setdefault(partition, {})[position] = meta[query] if score is None else {**meta[query],
                                                                                          "clip_score": score}
            if query >= 0:
                kept_per_query[query] += 1
    return keep, kept_per_query


# --------------------------------------------------------------------------- the job


def curate(source: SourceConfig, queries_file: str | None, out_dir: str, options: CurateOptions | None = None,
           score_filter: ScoreFilter | None = None) -> dict:
    """Curates `source` against the queries in `queries_file` and/or by `score_filter` into shards under
    `out_dir`; returns the report.

    Uses the Ray cluster this process is connected to, or connects as `connect_ray` does.
    """
    options = options or CurateOptions()
    options.validate()
    source.validate("source")
    if queries_file is None and score_filter is None:
        raise ValueError("curation needs a queries file, a score filter, or both")
    if score_filter is not None:
        score_filter.validate()
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
    decided, matched, later_drops, score_report = decide(scan, options, len(matcher), score_filter, partitions,
                                                         source)
    keep, kept_per_query = kept_positions(decided, matcher.names)
    dropped = dict(planning.failed)
    for fates in (count_fates(scan), later_drops, count_fates(decided)):
        for reason, n in fates.items():
            if reason != KEPT:
                dropped[reason] = dropped.get(reason, 0) + n
    steps_run = {NO_QUERY_MATCH: len(matcher), LOW_CLIP_SCORE: score_filter is not None,
                 DUPLICATE_IMAGE: options.dedup_images, OVER_CAP: len(matcher)}
    for fate, ran in steps_run.items():
        if ran:  # a step that ran says so, with 0 when it dropped nothing
            dropped.setdefault(fate, 0)
    kept = sum(len(positions) for positions in keep.values())

    results = run_partitions(partitions, source, options.write_options(), out_dir, keep=keep)
    written = sum_counts(results)
    report = {
        "pairs_seen": scan.count() + planning.num_failed,
        "kept": kept,
        "dropped": dict(sorted(dropped.items())),
        "queries": {matcher.names[q]: {"matched": matched[q], "kept": kept_per_query[q]}
                    for q in range(len(matcher)) if matched[q]},
        "num_queries": len(matcher),
        "queries_matched": sum(n > 0 for n in matched),
        "clip_score": score_report,
        "samples_written": written.ok,
        "shards": sorted(name for result in results for name in result["shards"]),
        "duration_s": round(time.time() - started, 3),
        "input": dataclasses.asdict(source),
        "queries_file": str(queries_file) if queries_file is not None else None,
        "options": dataclasses.asdict(options),
        "output": {"dir": str(out_dir)},
    }
    fs, root = resolve(out_dir)
    write_json(fs, join(root, REPORT_FILE), report)
    return report
