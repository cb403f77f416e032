"""Balancing the pairs over the queries: CLIP's per-query cap ("rarest") or MetaCLIP's per-query sampling.

Both see the pairs that survived every earlier step, and each query's matched
count (pairs that matched it before the score filter and dedup), and both decide
by seeded hashes of (seed, partition, position), so the choice is the same for
any number of workers and any block layout.

- rarest (CLIP's cap, t = `max_per_query`): a pair counts toward its rarest
  query, the one with the fewest matched pairs (ties to the query listed first).
  Within a query the t pairs of smallest `cap_rank` stay. At most t kept pairs
  are assigned to a query, but a frequent query also occurs in pairs kept for a
  rarer one, so more than t kept pairs can contain it.
- metaclip (MetaCLIP, Xu et al. 2023, t = `max_per_query`): every (pair, query)
  match draws u = `draw_rank(...)` / 2^64 and the match hits when
  u < t / matched[query]; a pair stays when any of its matches hits. A query with
  at most t matches keeps all of them; a frequent one keeps about t on its own
  account, and its pairs can still come in through a rarer query they contain.
  This flattens the head of the query distribution without emptying it, which is
  what beat CLIP's own data at equal size.

Each kept pair's `query` (what its meta names) is its assigned query (rarest) or
the rarest query whose match hit (metaclip); `kept_for` lists the queries whose
share kept it: the report's per-query "kept".
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa
import ray

from clip_ray.data.offline.pair_rows import KEPT, OVER_CAP, in_whole_groups, order_in_groups, set_column, set_drop

BalanceMode = Literal["rarest", "metaclip"]
BALANCE_MODES: tuple[str, ...] = ("rarest", "metaclip")
_LIST = pa.list_(pa.int32())


def cap_rank(seed: int, partition: int, position: int) -> int:
    """The seeded pseudo-random order in which a query's pairs are kept under the cap (smallest first)."""
    digest = hashlib.sha256(f"{seed}/{partition}/{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def draw_rank(seed: int, partition: int, position: int, query: int) -> int:
    """MetaCLIP's draw for one match, as a 64-bit integer: it hits when draw * matched < t * 2^64, exactly."""
    digest = hashlib.sha256(f"{seed}/{partition}/{position}/{query}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _assign_rarest(batch: pa.Table, matched: list[int]) -> pa.Table:
    assigned = [min(ids, key=lambda q: (matched[q], q)) for ids in batch["queries"].to_pylist()]
    return set_column(batch, "query", assigned, pa.int32())


def _apply_cap(block: pa.Table, cap: int, seed: int) -> pa.Table:
    """Whole groups of pairs assigned to one query: in each, the `cap` of lowest rank stay (ties to the earlier
    pair), the rest are over the cap."""
    places = zip(block["partition"].to_pylist(), block["position"].to_pylist())
    block = block.append_column("_rank", pa.array([cap_rank(seed, *place) for place in places], pa.uint64()))
    block, place = order_in_groups(block, "query", ["_rank", "partition", "position"])
    kept = place < cap
    block = set_drop(block.drop_columns(["_rank"]), np.where(kept, KEPT, OVER_CAP).tolist())
    queries = block["query"].to_pylist()
    return set_column(block, "kept_for", [[q] if keep else [] for q, keep in zip(queries, kept)], _LIST)


def _draw_metaclip(batch: pa.Table, matched: list[int], threshold: int, seed: int) -> pa.Table:
    columns = (batch[name].to_pylist() for name in ("partition", "position", "queries"))
    fates, names, hits = [], [], []
    for partition, position, queries in zip(*columns):
        hit = [q for q in queries if draw_rank(seed, partition, position, q) * matched[q] < threshold << 64]
        fates.append(KEPT if hit else OVER_CAP)
        names.append(min(hit, key=lambda q: (matched[q], q)) if hit else -1)
        hits.append(hit)
    batch = set_column(set_drop(batch, fates), "query", names, pa.int32())
    return set_column(batch, "kept_for", hits, _LIST)


def balance(survivors: ray.data.Dataset, mode: BalanceMode, matched: list[int], threshold: int, seed: int,
            num_partitions: int) -> ray.data.Dataset:
    """The surviving rows with their balance fate (KEPT or OVER_CAP), `query` and `kept_for` set."""
    if mode == "metaclip":  # a per-pair function of the global counts: no shuffle
        return survivors.map_batches(_draw_metaclip, batch_format="pyarrow",
                                     fn_kwargs={"matched": matched, "threshold": threshold, "seed": seed})
    if mode != "rarest":
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {mode!r}")
    assigned = survivors.map_batches(_assign_rarest, fn_kwargs={"matched": matched}, batch_format="pyarrow")
    return in_whole_groups(assigned, "query", _apply_cap, num_partitions, cap=threshold, seed=seed)
