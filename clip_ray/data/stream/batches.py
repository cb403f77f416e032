"""A worker's side of the stream: its rows as torch batches, and, for training, shuffled in windows
with a position that resumes without decoding what was consumed.

A training worker's rows arrive in plan order (unit after unit, each unit in its
seeded shuffled order; see pipeline). They are cut into windows of
`window_batches(shuffle_buffer, B) * B` consecutive rows; each window is permuted
by a generator seeded by (seed, epoch, rank, window) and handed out as batches of
B rows. A window's rows are consecutive in the stream, so after any batch a
StreamPosition needs only four integers:

    window, batches_in_window     how far the consumer got
    after_unit, after_ordinal     the last stream row before that window (unit index, ordinal)

To resume, the stream is rebuilt from just after (after_unit, after_ordinal):
units before it are not read, the unit it ends in skips its consumed ordinals
before decoding, and the window is re-made (at most one window decoded again),
permuted the same way, and its first batches_in_window batches dropped. Batches
are full: a share's last rows short of a batch are dropped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import ray
import torch

from clip_ray.data.stream.preprocess import normalize_on_device

# Batches read straight from Ray are read-only views of the object store; the tensors made from them are
# only read or copied to the device, so torch's warning about that is noise (here, and only here).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


@dataclass(frozen=True)
class StreamPosition:
    """Where one worker stands in its share of an epoch (see the module docstring)."""

    window: int = 0
    batches_in_window: int = 0
    after_unit: int = -1  # -1: the window is the share's first
    after_ordinal: int = -1

    @property
    def after(self) -> tuple[int, int]:
        return self.after_unit, self.after_ordinal

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> "StreamPosition":
        return cls(**{field.name: int(saved[field.name]) for field in dataclasses.fields(cls)})


def window_batches(shuffle_buffer: int, batch_size: int) -> int:
    """Batches per shuffle window: the window holds about `shuffle_buffer` rows, and at least one batch."""
    return max(1, round(shuffle_buffer / batch_size))


def window_seed(seed: int, epoch: int, rank: int, window: int) -> int:
    """The permutation seed of one window: the same in every process, and on resume."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}/{window}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _to_torch(batch: dict[str, np.ndarray], device: torch.device | str | None, normalize: bool) -> dict:
    out = dict(batch)
    for name in ("image", "text"):
        tensor = torch.from_numpy(batch[name])
        out[name] = tensor.to(device, non_blocking=True) if device is not None else tensor
    if normalize and out["image"].dtype == torch.uint8:
        out["image"] = normalize_on_device(out["image"])
    return out


class TrainBatches:
    """One worker's training batches of one epoch; `position` is where a resume would start after the
    batch last handed out."""

    def __init__(self, dataset: ray.data.Dataset | ray.data.DataIterator, batch_size: int, *, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int = 0, start: StreamPosition = StreamPosition(),
                 device: torch.device | str | None = None, normalize: bool = True):
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle_buffer > 0
        self.window_rows = window_batches(shuffle_buffer, batch_size) * batch_size
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.position = start
        self.device, self.normalize = device, normalize

    def __iter__(self) -> Iterator[dict]:
        size, start = self.batch_size, self.position
        windows = self.dataset.iter_batches(batch_size=self.window_rows, batch_format="numpy", drop_last=False,
                                            prefetch_batches=1)
        after = start.after
        for number, window in enumerate(windows, start=start.window):
            rows = len(window["unit"])
            if self.shuffle:
                order = np.random.default_rng(window_seed(self.seed, self.epoch, self.rank, number)).permutation(rows)
            else:
                order = np.arange(rows)
            full = rows // size
            here = StreamPosition(number, 0, *after)
            # After a window's last batch the position points past the window: a resume reads none of it.
            past = StreamPosition(number + 1, 0, int(window["unit"][-1]), int(window["ordinal"][-1]))
            for j in range(start.batches_in_window if number == start.window else 0, full):
                self.position = past if j + 1 == full else dataclasses.replace(here, batches_in_window=j + 1)
                picked = order[j * size:(j + 1) * size]
                yield _to_torch({name: column[picked] for name, column in window.items()}, self.device, self.normalize)
            after = past.after


def iter_worker_batches(
    data: ray.data.Dataset | ray.data.DataIterator, batch_size: int, *, drop_last: bool = False,
    device: torch.device | str | None = None, normalize: bool = True, prefetch_batches: int = 2,
) -> Iterator[dict]:
    """{"image", "text"} tensors (plus the other columns as arrays) of `batch_size` rows, in stream order.

    uint8 images are moved to `device` first and normalised there.
    """
    batches = data.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                prefetch_batches=prefetch_batches)
    for batch in batches:
        yield _to_torch(batch, device, normalize)


def eval_batches(data: ray.data.Dataset | ray.data.DataIterator, batch_size: int, **kwargs) -> Iterator[dict]:
    """Every row in order, the last batch possibly short; kwargs as for iter_worker_batches."""
    return iter_worker_batches(data, batch_size, drop_last=False, **kwargs)
