"""Where the data pipeline's tasks count what they could not use, and where the job reads it back.

Bad samples are skipped and counted by reason inside the preprocessing tasks
(clip_ray.data.stream.pipeline); each unit's counts go to one small actor, keyed by
unit, so a retried task overwrites rather than adds. The training loop asks it
whether a source failed too often, mid-epoch and at the end.
"""

from __future__ import annotations

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from clip_ray.data.formats import DataError, FailureCounts, check_failure_rate

# A periodic (mid-epoch) failure check only judges sources with at least this many items.
MIN_ITEMS_FOR_RATE = 1000


def train_stream(epoch: int) -> str:
    """The FailureTracker key of one training epoch."""
    return f"train/epoch-{epoch}"


@ray.remote(num_cpus=0)
class _FailureLedger:
    """Each unit's FailureCounts by (stream, source, unit); the last report of a unit wins."""

    def __init__(self):
        self.reports: dict[str, dict[tuple[str, str], dict]] = {}

    def report(self, stream: str, source: str, unit: str, counts: dict) -> None:
        self.reports.setdefault(stream, {})[(source, unit)] = counts

    def counts(self, stream: str) -> dict[str, dict]:
        by_source: dict[str, FailureCounts] = {}
        for (source, _), counts in sorted(self.reports.get(stream, {}).items()):
            by_source.setdefault(source, FailureCounts()).merge(FailureCounts.from_dict(counts))
        return {source: counts.to_dict() for source, counts in by_source.items()}

    def forget(self, stream: str) -> None:
        self.reports.pop(stream, None)

    def snapshot(self, stream: str) -> dict[str, dict]:
        return {f"{source}\t{unit}": counts for (source, unit), counts in self.reports.get(stream, {}).items()}

    def restore(self, stream: str, snapshot: dict[str, dict]) -> None:
        for name, counts in snapshot.items():
            source, _, unit = name.rpartition("\t")
            self.reports.setdefault(stream, {})[(source, unit)] = counts


class FailureTracker:
    """Where preprocessing tasks send their failure counts, and where the job reads them back.

    A small actor (no CPU) rather than a column of the batches: rows dropped by the
    split or the last partial batch would take their counts with them, and a
    retried task would count twice. Picklable; with `name`, any process of the job
    can also find it by name.
    """

    def __init__(self, name: str | None = None):
        options = {"name": name, "get_if_exists": True} if name else {}
        # On the creator's node where it can be (rank 0's, in training): the ledger then dies only with a
        # node the job restarts for anyway, not with a data node whose tasks Ray Data re-runs elsewhere.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.actor = _FailureLedger.options(scheduling_strategy=here, **options).remote()

    def report(self, stream: str, source: str, unit: str, counts: FailureCounts) -> None:
        """Blocks until recorded, so a task's counts are in before its last rows are visible."""
        ray.get(self.actor.report.remote(stream, source, unit, counts.to_dict()))

    def counts(self, stream: str) -> dict[str, FailureCounts]:
        """Per source, end to end (reading + decoding): ok = rows emitted; failed by reason."""
        return {s: FailureCounts.from_dict(c) for s, c in ray.get(self.actor.counts.remote(stream)).items()}

    def total(self, stream: str) -> FailureCounts:
        return sum(self.counts(stream).values(), FailureCounts())

    def check(self, stream: str, max_fraction: float, final: bool = True) -> dict[str, FailureCounts]:
        """Raises DataError naming the first source that failed too often or, when `final`, gave nothing.

        `final` is for the end of a fully read epoch. Mid-epoch (final=False) a
        source is judged only once it has MIN_ITEMS_FOR_RATE items, so a few bad
        samples early on do not stop a run.
        """
        counts = self.counts(stream)
        if final and not counts:
            raise DataError(f"{stream}: no data source reported any item; was the epoch read?")
        for source, source_counts in counts.items():
            if final or source_counts.total >= MIN_ITEMS_FOR_RATE:
                check_failure_rate(source_counts, max_fraction, source)
        return counts

    def forget(self, stream: str) -> None:
        self.actor.forget.remote(stream)

    def snapshot(self, stream: str) -> dict[str, dict]:
        """The stream's reports so far, as plain values a checkpoint can hold."""
        return ray.get(self.actor.snapshot.remote(stream))

    def restore(self, stream: str, snapshot: dict[str, dict]) -> None:
        """Reports from a checkpoint's snapshot: a resumed epoch does not read its consumed units again.
        A unit read again in part (the one a resume starts inside) reports only its rest."""
        ray.get(self.actor.restore.remote(stream, snapshot))
