"""Each worker's share of an epoch's stream, and where every worker stands in it.

Rank 0 plans the epoch (lists the sources once) and hands the plan and its
FailureTracker to every rank; each rank builds a Ray Data stream of its own
units (pipeline.rank_units) and reads it in shuffled windows (batches.TrainBatches).
Shares differ by up to a unit's rows, so the ranks agree where the epoch ends:
each batch comes with "I have another one", which TrainStep folds into the
all-reduce it already does, and the epoch ends for everyone at the first batch
after which some rank has none (the longer shares' tails are dropped).

A checkpoint records every rank's StreamPosition and the epoch's failure counts
so far; a resumed worker starts its stream from its own position (see batches).
Resumed under another world size, the units every old rank had finished are
left out and the rest of the epoch is shared anew.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
import torch.distributed as dist

from clip_ray.config import Config
from clip_ray.data.formats import FailureCounts
from clip_ray.data.stream.batches import StreamPosition, TrainBatches
from clip_ray.data.stream.failure_tracker import FailureTracker, train_stream
from clip_ray.data.stream.pipeline import build_train_dataset, plan_train_epoch, rank_units
from clip_ray.eval.gather import broadcast_from_rank0, gather_objects
from clip_ray.loss import rank_and_world
from clip_ray.worker.context import WorkerContext

log = logging.getLogger("clip_ray.train")


def _all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (one small all-reduce)."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def units_left(plan: list[dict], saved: list[dict], world_size: int) -> list[dict]:
    """The plan less the units that ranks of a world of len(saved) had fully consumed (whole units before
    each one's window); what those ranks had read of the rest is read again."""
    done = set()
    for rank, position in enumerate(saved):
        after_unit = StreamPosition.from_dict(position).after_unit
        done.update(unit["index"] for unit in rank_units(plan, rank, len(saved))
                    if unit["slices"] == 1 and unit["index"] < after_unit)
    return [unit for unit in plan if unit["index"] not in done]


class EpochData:
    """One rank's batches, epoch after epoch; `positions()` gathers every rank's place for a checkpoint."""

    def __init__(self, config: Config, context: WorkerContext):
        self.config = config
        self.context = context
        self.batch_size = config.train.global_batch_size // context.world_size
        self.failures = FailureTracker() if context.rank == 0 else None
        self.position = StreamPosition()  # after the last batch handed out
        self._saved: dict | None = None  # a checkpoint's data position, for its epoch

    def restore(self, saved: dict) -> None:
        """Resume the checkpoint's epoch where every rank stood (`saved` is its data_position)."""
        self._saved = saved
        epoch = int(saved.get("epoch", 0))
        if self.failures is not None and saved.get("failures"):
            self.failures.restore(train_stream(epoch), saved["failures"])

    def next_epoch(self) -> None:
        self.position = StreamPosition()

    def positions(self, epoch: int) -> dict:
        """Every rank's position and (rank 0) the epoch's failure reports: a checkpoint's extra data
        position. Collective: every rank calls it."""
        streams = gather_objects(self.position.as_dict())
        failures = self.failures.snapshot(train_stream(epoch)) if self.failures is not None else {}
        return {"streams": streams, "failures": failures}

    def _share(self, epoch: int) -> tuple[list[dict], StreamPosition, FailureTracker]:
        cfg, rank, world = self.config, self.context.rank, self.context.world_size
        plan = plan_train_epoch(cfg.data, epoch) if rank == 0 else None
        plan, tracker = broadcast_from_rank0((plan, self.failures))
        saved, self._saved = self._saved, None
        if saved is None or int(saved.get("epoch", 0)) != epoch:
            return rank_units(plan, rank, world), StreamPosition(), tracker
        streams = saved.get("streams") or []
        if len(streams) == world:
            return rank_units(plan, rank, world), StreamPosition.from_dict(streams[rank]), tracker
        if rank == 0 and int(saved.get("batches_in_epoch", 0)) > 0:
            why = (f"with {world} workers instead of {len(streams)}" if streams else
                   "from a checkpoint without stream positions (an older clip-ray)")
            log.warning("resuming epoch %d %s: the units every worker had finished are skipped, the rest of "
                        "the epoch is read again and shared anew", epoch, why)
        return rank_units(units_left(plan, streams, world), rank, world), StreamPosition(), tracker

    def batches(self, epoch: int) -> Iterator[tuple[dict, bool]]:
        """(batch, whether this rank has another one) for this rank's rest of the epoch; nothing at all
        unless every rank has a first batch."""
        cfg, context = self.config, self.context
        units, start, tracker = self._share(epoch)
        dataset = build_train_dataset(cfg.data, cfg.model.vision.image_size, cfg.model.text.context_length, epoch,
                                      tracker, train_stream(epoch), units=units, after=start.after)
        stream = TrainBatches(dataset, self.batch_size, shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.data.seed,
                              epoch=epoch, rank=context.rank, start=start, device=context.device)
        self.position = start
        batches = iter(stream)
        current = next(batches, None)
        if not _all_ranks(current is not None, context.device):
            return
        while current is not None:
            position = stream.position
            upcoming = next(batches, None)  # read ahead: Ray Data prefetches it anyway
            self.position = position
            yield current, upcoming is not None
            current = upcoming

    def failure_counts(self, epoch: int, final: bool) -> dict[str, FailureCounts]:
        """Rank 0 only: counts per source; raises DataError when a source fails too often."""
        if self.failures is None:
            return {}
        return self.failures.check(train_stream(epoch), self.config.data.max_failure_fraction, final=final)
