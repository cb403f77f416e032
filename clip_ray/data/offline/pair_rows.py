"""Curation's per-pair rows: their schema, the fates, and the small table operations every global step shares.

Pass one turns each input pair into one SCAN_SCHEMA row (no image, no caption);
every later step (overlap removal, the score filter, dedup, balancing) is a Ray
Data transform of those rows that sets `drop` on the pairs it removes. A row whose
`drop` is KEPT ("") is still in the running.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.context import ShuffleStrategy

KEPT = ""
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NO_QUERY_MATCH = "no_query_match"
EVAL_OVERLAP = "eval_overlap"
DUPLICATE_IMAGE = "duplicate_image"
OVER_CAP = "over_cap"

# One row per input pair (position -1: a pair the reader could not even yield). `queries`: every query the caption
# matches; `query`: the one its meta names; `kept_for`: the queries whose share of the balance kept it.
SCAN_SCHEMA = pa.schema([
    ("partition", pa.int32()), ("position", pa.int32()), ("drop", pa.string()),
    ("queries", pa.list_(pa.int32())), ("image_hash", pa.binary()), ("query", pa.int32()), ("score", pa.float32()),
    ("kept_for", pa.list_(pa.int32())),
])
SIDE = "_side"  # while two datasets are joined: 0 for a row of the pairs, 1 for a row of the other side


def _still_in_block(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch["drop"], KEPT))


def still_in(dataset: ray.data.Dataset) -> ray.data.Dataset:
    """The rows still in the running."""
    return dataset.map_batches(_still_in_block, batch_format="pyarrow")


def set_column(group: pa.Table, name: str, values: list, kind: pa.DataType) -> pa.Table:
    return group.set_column(group.schema.get_field_index(name), name, pa.array(values, kind))


def set_drop(group: pa.Table, fates: list[str]) -> pa.Table:
    return set_column(group, "drop", fates, pa.string())


def _fates_in_block(batch: pa.Table) -> pa.Table:
    fates = pc.value_counts(batch["drop"])
    return pa.table({"drop": fates.field("values"), "count": fates.field("counts")})


def count_fates(dataset: ray.data.Dataset) -> dict[str, int]:
    """{fate: pairs}, summed on the driver from per-block counts (a dozen rows per block at most)."""
    totals: dict[str, int] = {}
    for row in dataset.map_batches(_fates_in_block, batch_size=None, batch_format="pyarrow").take_all():
        totals[row["drop"]] = totals.get(row["drop"], 0) + row["count"]
    return totals


def _one_row_per_query(batch: pa.Table, column: str) -> pa.Table:
    return pa.table({"query": pc.list_flatten(batch[column])})


def pairs_per_query(rows: ray.data.Dataset, column: str, num_queries: int, num_partitions: int) -> list[int]:
    """How many rows hold each query id in their list `column`: a groupby count, so the driver gets one row per
    query."""
    counts = [0] * num_queries
    if not num_queries:
        return counts
    per_query = (rows.map_batches(_one_row_per_query, fn_kwargs={"column": column}, batch_format="pyarrow")
                 .groupby("query", num_partitions=num_partitions).count())
    for batch in per_query.iter_batches(batch_format="pyarrow"):
        for query, pairs in zip(batch["query"].to_pylist(), batch["count()"].to_pylist()):
            counts[query] = pairs
    return counts


_HASH_SHUFFLES = (ShuffleStrategy.HASH_SHUFFLE, ShuffleStrategy.SHUFFLE_V2, ShuffleStrategy.GPU_SHUFFLE)


def in_whole_groups(dataset: ray.data.Dataset, key: str, fn: Callable[..., pa.Table], num_partitions: int,
                    **fn_kwargs) -> ray.data.Dataset:
    """`fn` over blocks that each hold whole groups of the rows sharing `key`, placed as map_groups places them,
    but called once per block: with a per-pair key (an image hash) map_groups would call it once per pair."""
    if dataset.context.shuffle_strategy in _HASH_SHUFFLES:
        shuffled = dataset.repartition(num_partitions, keys=[key], sort=True)
    else:
        shuffled = dataset.sort(key)
    return shuffled.map_batches(fn, batch_size=None, batch_format="pyarrow", fn_kwargs=fn_kwargs)


def order_in_groups(block: pa.Table, key: str, order: list[str]) -> tuple[pa.Table, np.ndarray]:
    """(the block sorted by `key`, then `order`; each row's place in its group of equal keys, from 0)."""
    block = block.sort_by([(name, "ascending") for name in (key, *order)])
    keys = block[key].to_numpy(zero_copy_only=False)
    starts_group = np.ones(len(keys), dtype=bool)
    starts_group[1:] = keys[1:] != keys[:-1]
    group_start = np.maximum.accumulate(np.where(starts_group, np.arange(len(keys)), 0))
    return block, np.arange(len(keys)) - group_start


def _as_side(batch: pa.Table, side: int, schema: pa.Schema) -> pa.Table:
    """`batch` in the pairs' `schema` (missing columns null) plus the side it came from."""
    columns = [batch[f.name].cast(f.type) if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type)
               for f in schema]
    columns.append(pa.array(np.full(batch.num_rows, side, dtype=np.int8)))
    return pa.Table.from_arrays(columns, schema=schema.append(pa.field(SIDE, pa.int8())))


def joined_by(pairs: ray.data.Dataset, other: ray.data.Dataset, key: str, match: Callable[[pa.Table], pa.Table],
              num_partitions: int) -> ray.data.Dataset:
    """A join as one shuffle: both sides' rows, in the pairs' schema plus SIDE, in blocks holding whole groups of
    `key`, handed to `match`, which returns the block's pair rows (without SIDE)."""
    schema = pairs.schema().base_schema
    left = pairs.map_batches(_as_side, fn_kwargs={"side": 0, "schema": schema}, batch_format="pyarrow")
    right = other.map_batches(_as_side, fn_kwargs={"side": 1, "schema": schema}, batch_format="pyarrow")
    return in_whole_groups(left.union(right), key, match, num_partitions)
