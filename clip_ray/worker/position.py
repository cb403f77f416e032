"""Where the workers' loop stands in its run: saved in every checkpoint, beside each worker's
place in its own stream (worker.epoch_data), so that a resumed worker continues with the batch
that would have come next."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DataPosition:
    step: int = 0  # optimiser steps taken (a skipped non-finite step does not count)
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of this epoch consumed, skipped steps included
    samples_seen: int = 0
    unique_samples: int = 0  # pairs of the first epoch seen so far (after it, the epoch's size)
    nonfinite_steps: int = 0

    @classmethod
    def from_dict(cls, saved: dict) -> "DataPosition":
        """A checkpoint's position; fields an older checkpoint lacks start at 0."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: int(value) for key, value in saved.items() if key in names})

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def consume_batch(self, global_batch_size: int, nonfinite_steps: int) -> None:
        """A batch went through the step function, applied or skipped."""
        self.batches_in_epoch += 1
        self.samples_seen += global_batch_size
        if self.epoch == 0:
            self.unique_samples += global_batch_size
        self.nonfinite_steps = nonfinite_steps

    def next_epoch(self) -> None:
        self.epoch += 1
        self.batches_in_epoch = 0
