"""Where a training worker runs: inside Ray Train, or in-process for tests and debugging.

The loop asks its context for rank, world size and device, hands it metrics and
checkpoint directories, and asks it for the checkpoint to resume from. Ray
Train's version persists checkpoints to `storage_path` and keeps the latest K;
the local version does the same in a plain directory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from clip_ray.worker.checkpoint import find_latest_checkpoint, is_complete_checkpoint


@dataclass
class WorkerContext:
    """A world of one process that keeps its checkpoints under `checkpoint_root`."""

    checkpoint_root: Path | None = None
    keep_checkpoints: int = 3
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reported: list[dict] = field(default_factory=list)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """Records metrics; moves a finished checkpoint directory into place and prunes old ones."""
        self.reported.append(dict(metrics))
        if checkpoint_dir is None or self.checkpoint_root is None:
            return
        self.checkpoint_root.mkdir(parents=True, exist_ok=True)
        target = self.checkpoint_root / f"checkpoint_{int(metrics['step']):09d}"
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(checkpoint_dir), target)
        complete = sorted(p for p in self.checkpoint_root.glob("checkpoint_*") if is_complete_checkpoint(p))
        for old in complete[:-self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        return find_latest_checkpoint(self.checkpoint_root) if self.checkpoint_root else None

    def release(self) -> None:
        """Nothing to hand back in-process."""


class RayTrainContext(WorkerContext):
    """The context of a Ray Train V2 worker: ray.train.report persists checkpoints for us."""

    def __init__(self):
        ctx = ray.train.get_context()
        super().__init__(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                         device=ray.train.torch.get_device())
        self._restored_dir = None

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)  # collective: every rank calls it
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # persisted to storage_path by now

    def latest_checkpoint(self) -> Path | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored_dir = checkpoint.as_directory()
        return Path(self._restored_dir.__enter__())

    def release(self) -> None:
        if self._restored_dir is not None:
            self._restored_dir.__exit__(None, None, None)
            self._restored_dir = None
