"""A deterministic plan for reading several shard sources mixed by weight.

Semantics of `plan_mixture(sources, seed, epoch, num_shards)`:

- an epoch is `num_shards` shard reads (default: every shard of every source once);
- source i gets round(num_shards * w_i / sum(w)) of them (largest remainders
  break ties), so weights are per shard: if one source's shards hold twice as
  many samples, halve its weight to mix by samples;
- each source is read as an endless stream of passes over its shards, every pass
  in a fresh seeded order; epoch e takes the next slice of that stream, so a
  down-weighted source shows different shards each epoch and covers all of them
  over epochs, and an up-weighted one repeats shards only after a full pass;
- the chosen shards are interleaved evenly (a source with a third of the reads
  appears at every third slot), not in blocks.

The plan depends on nothing but its arguments, so every worker and a resumed run
compute the same one; "the first k entries of epoch e are done" is a complete
record of progress.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class MixSource:
    name: str
    shards: Sequence[str]
    weight: float = 1.0


@dataclass(frozen=True)
class PlannedShard:
    source: str  # MixSource.name
    path: str
    repeat: int  # which pass over its source's shards this read belongs to (0 = first)


def _quotas(weights: list[float], total: int) -> list[int]:
    """Integer shares of `total` proportional to `weights` (largest remainder method)."""
    exact = [total * w / sum(weights) for w in weights]
    quotas = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _pass_order(source: MixSource, seed: int, repeat: int) -> list[str]:
    order = list(source.shards)
    random.Random(f"{seed}/{source.name}/{repeat}").shuffle(order)  # str seeds hash the same in every process
    return order


def plan_mixture(
    sources: Sequence[MixSource], seed: int, epoch: int = 0, num_shards: int | None = None,
) -> list[PlannedShard]:
    """The shard reads of one epoch, in order; see the module docstring for the semantics."""
    names = [source.name for source in sources]
    if not sources or len(set(names)) != len(names):
        raise ValueError(f"need at least one source and unique names, got {names}")
    for source in sources:
        if source.weight < 0 or not math.isfinite(source.weight):
            raise ValueError(f"source {source.name!r}: weight must be finite and >= 0, got {source.weight}")
        if source.weight > 0 and not source.shards:
            raise ValueError(f"source {source.name!r} has weight {source.weight} but no shards")
    if sum(source.weight for source in sources) <= 0:
        raise ValueError("at least one source needs a positive weight")
    total = sum(len(source.shards) for source in sources) if num_shards is None else num_shards
    slots = []
    for order, (source, quota) in enumerate(zip(sources, _quotas([s.weight for s in sources], total))):
        first = epoch * quota  # this epoch's slice of the source's endless stream of passes
        passes: dict[int, list[str]] = {}
        for k in range(quota):
            repeat, position = divmod(first + k, len(source.shards))
            if repeat not in passes:
                passes[repeat] = _pass_order(source, seed, repeat)
            path = passes[repeat][position]
            slots.append(((k + 0.5) / quota, order, PlannedShard(source.name, path, repeat)))
    slots.sort(key=lambda slot: slot[:2])
    return [planned for _, _, planned in slots]
