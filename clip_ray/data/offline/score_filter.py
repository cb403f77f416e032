"""A per-pair score filter for curation: scores joined to the scan rows, a threshold and/or a top-fraction cut.

The scores come from a `PairScorer` the caller gives (the CLIP score is
clip_ray.inference.clip_score's; this layer knows nothing of models). It gets the
candidate rows, (partition, position) of every pair still in the running, and
returns one SCORE_SCHEMA row per candidate it could score, or with `drop` set to
the reason it could not (an image that does not decode): small rows, never images.

Those rows are joined to the candidates by (partition, position): both sides go
into one Ray Data shuffle by partition, and each block's rows (whole
partitions) are matched there. A candidate without a score row (its partition read shorter the second
time) is dropped as unreadable_shard. Then every scored pair gets its fate:

- `min_score`: a pair whose score is below it is low_clip_score;
- `top_fraction` f: the scored pairs are sorted by score, highest first, ties to
  the earlier pair (partition, then position), and the first ceil(f x scored) stay
  (f x scored is rounded to 9 decimals first, so 0.3 of 10 is 3); the rest are
  low_clip_score too. With both, a pair must pass both. A NaN score (a model
  overflowing in half precision) passes neither and is not counted as scored.

The sort runs over the scored rows only (a score and two ints each); order
statistics come from the sorted, materialised rows by index, so the quantiles
in the report and the score at the cut are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import FailureReason
from clip_ray.data.offline.pair_rows import SIDE, joined_by, set_column, set_drop
from clip_ray.data.offline.partitions import Partition

LOW_CLIP_SCORE = "low_clip_score"
# What a scorer returns per candidate: drop "" for a scored pair, else why it could not be scored (score NaN).
SCORE_SCHEMA = pa.schema([("partition", pa.int32()), ("position", pa.int32()), ("score", pa.float32()),
                          ("drop", pa.string())])
QUANTILES = {"min": 0.0, "p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "max": 1.0}


class PairScorer(Protocol):
    def __call__(self, candidates: ray.data.Dataset, partitions: list[Partition],
                 source: SourceConfig) -> ray.data.Dataset:
        """SCORE_SCHEMA rows for the (partition, position) rows of `candidates` (see the module docstring)."""


@dataclass
class ScoreFilter:
    """What curation needs to filter by a score: the scorer, the rule, and what the report says about the scorer."""

    scorer: PairScorer
    min_score: float | None = None
    top_fraction: float | None = None
    about: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.min_score is None and self.top_fraction is None:
            raise ValueError("a score filter needs min_score or top_fraction")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")


# --------------------------------------------------------------------------- the join


def _match_scores(block: pa.Table) -> pa.Table:
    """Whole partitions' candidate and score rows -> their candidate rows with score and drop filled in."""
    is_score = pc.equal(block[SIDE], 1)
    scores = block.filter(is_score)
    found: dict[tuple[int, int], tuple[float, str]] = {}
    for place, score, drop in zip(zip(scores["partition"].to_pylist(), scores["position"].to_pylist()),
                                  scores["score"].to_pylist(), scores["drop"].to_pylist()):
        found.setdefault(place, (score, drop))  # a retried task's repeat says the same
    pairs = block.filter(pc.invert(is_score)).drop_columns([SIDE])
    missing = (None, FailureReason.UNREADABLE_SHARD.value)
    matched = [found.get(place, missing) for place in zip(pairs["partition"].to_pylist(),
                                                          pairs["position"].to_pylist())]
    pairs = set_column(pairs, "score", [score for score, _ in matched], pa.float32())
    return set_drop(pairs, [drop for _, drop in matched])


def attach_scores(candidates: ray.data.Dataset, scores: ray.data.Dataset, num_partitions: int) -> ray.data.Dataset:
    """The candidate rows with the scorer's score and drop, joined on (partition, position)."""
    return joined_by(candidates, scores, "partition", _match_scores, num_partitions)


# --------------------------------------------------------------------------- the cut


def _scored_only(batch: pa.Table) -> pa.Table:
    """The pairs with a score to rank, as sort keys: a NaN (a model overflowing in fp16) is no score."""
    scored = batch.filter(pc.and_(pc.equal(batch["drop"], ""), pc.invert(pc.is_nan(batch["score"]))))
    return pa.table({"order": pc.negate(scored["score"]), "partition": scored["partition"],
                     "position": scored["position"]})


def top_fraction_size(fraction: float, scored: int) -> int:
    """How many pairs a top-`fraction` cut keeps: ceil(fraction x scored), the product rounded to 9 decimals first."""
    return max(1, math.ceil(round(fraction * scored, 9))) if scored else 0


def rows_at(ranked: ray.data.MaterializedDataset, indices: list[int]) -> dict[int, dict]:
    """{index: row} of a materialised dataset's rows at those indices (in its order): found from the blocks'
    row counts, and only the blocks that hold them are fetched."""
    found: dict[int, dict] = {}
    start = 0
    for bundle in ranked.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            end = start + entry.metadata.num_rows
            inside = [index for index in indices if start <= index < end]
            if inside:
                block: pa.Table = ray.get(entry.ref)
                found.update((index, block.slice(index - start, 1).to_pylist()[0]) for index in inside)
            start = end
    return found


def scored_report(score_filter: ScoreFilter, scored: int) -> dict:
    """The report's "clip_score" part before the quantiles: the rule, the scorer, how many pairs were scored."""
    return {"min_score": score_filter.min_score, "top_fraction": score_filter.top_fraction, **score_filter.about,
            "scored": scored}


def rank_scores(judged: ray.data.Dataset, score_filter: ScoreFilter) -> tuple[tuple | None, dict]:
    """(the last pair a top-fraction cut keeps as (score, partition, position), or None; the report's part)."""
    ranked = judged.map_batches(_scored_only, batch_format="pyarrow").sort(["order", "partition", "position"])
    ranked = ranked.materialize()
    scored = ranked.count()
    report = scored_report(score_filter, scored)
    if not scored:
        return None, report
    # Quantile q is the score at ascending rank round(q (n - 1)); the ranking is descending.
    places = {name: scored - 1 - round(q * (scored - 1)) for name, q in QUANTILES.items()}
    keep = top_fraction_size(score_filter.top_fraction, scored) if score_filter.top_fraction is not None else None
    rows = rows_at(ranked, [*places.values(), *([keep - 1] if keep else [])])
    report["quantiles"] = {name: -rows[index]["order"] for name, index in places.items()}
    cut = None
    if keep is not None:
        last = rows[keep - 1]
        cut = (-last["order"], last["partition"], last["position"])
        report["top_fraction_kept"] = keep
        report["top_fraction_threshold"] = cut[0]
    return cut, report


def judge_scores(batch: pa.Table, min_score: float | None, cut: tuple | None) -> pa.Table:
    """Scored pairs that fail the threshold or fall below the cut become low_clip_score (NaN fails both)."""
    drop = batch["drop"].to_numpy(zero_copy_only=False)
    score = batch["score"].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls (unscored) are NaN
    passes = np.ones(len(drop), dtype=bool)
    if min_score is not None:
        passes &= score >= min_score
    if cut is not None:
        cut_score, cut_partition, cut_position = cut
        partition, position = batch["partition"].to_numpy(), batch["position"].to_numpy()
        earlier = (partition < cut_partition) | ((partition == cut_partition) & (position <= cut_position))
        passes &= (score > cut_score) | ((score == cut_score) & earlier)
    fates = np.where((drop == "") & ~passes, LOW_CLIP_SCORE, drop)
    return batch.set_column(batch.schema.get_field_index("drop"), "drop", pa.array(fates.tolist(), pa.string()))


def filter_by_score(candidates: ray.data.Dataset, score_filter: ScoreFilter, partitions: list[Partition],
                    source: SourceConfig, num_partitions: int) -> tuple[ray.data.Dataset, dict]:
    """(the candidates, each with its score and its fate after the filter; the report's "clip_score" part)."""
    places = candidates.select_columns(["partition", "position"])
    judged = attach_scores(candidates, score_filter.scorer(places, partitions, source), num_partitions).materialize()
    cut, report = rank_scores(judged, score_filter)
    filtered = judged.map_batches(judge_scores, fn_kwargs={"min_score": score_filter.min_score, "cut": cut},
                                  batch_format="pyarrow")
    return filtered.materialize(), report
