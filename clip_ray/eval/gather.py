"""Collectives for sharded evaluation: rows of different lengths from every rank, on NCCL or gloo.

`all_gather` needs tensors of one shape on every rank, and NCCL has no gather of
Python objects without a device tensor, so rows are gathered as: the row counts,
then every rank's rows padded to the longest, then trimmed. Outside a process
group (or in a world of one) each function is the identity.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from clip_ray.loss import rank_and_world


def _collective() -> bool:
    return rank_and_world()[1] > 1


def shard(count: int, rank: int, world_size: int) -> range:
    """Rank `rank`'s contiguous block of `count` items; blocks in rank order are all items in order."""
    return range(count * rank // world_size, count * (rank + 1) // world_size)


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's `rows` [n_r, ...] concatenated in rank order, on every rank.

    Trailing dimensions and dtype must agree across ranks; n_r may differ and be 0.
    """
    if not _collective():
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    if longest == 0:
        return rows
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[:n] for piece, n in zip(pieces, counts)])


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank (small things: names, keys)."""
    if not _collective():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's picklable `obj` on every rank (what other ranks pass is ignored)."""
    if not _collective():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
