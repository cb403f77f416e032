"""The zero-shot images: listed once, then read and decoded in shares.

Listing is cheap and decides which images count (the same on any number of
workers); reading and decoding is the expensive part, so a sharded evaluation
lists on one rank and each rank opens only its own share of the list.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow.fs as pafs
import torch

from clip_ray.data.formats import BadSample, FailureCounts, FailureReason, Sample, list_image_folder
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.storage import basename, resolve


class ListedImage(NamedTuple):
    path: str  # inside the folder's filesystem
    class_index: int


def spread_over_classes(items: Iterable, limit: int, num_classes: int) -> Iterator:
    """At most `limit` images, the same number from each class (ImageFolder lists class by class)."""
    per_class = max(1, limit // max(1, num_classes))
    taken: dict[int, int] = {}
    for item in items:
        if taken.get(item.class_index, 0) < per_class:
            taken[item.class_index] = taken.get(item.class_index, 0) + 1
            yield item


def select_images(root: str, limit: int | None, num_classes: int, counts: FailureCounts) -> list[ListedImage]:
    """The images an evaluation scores, without reading any; a folder that cannot be listed gives none."""
    try:
        _, images = list_image_folder(root)
    except OSError as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, str(root), "", f"{type(err).__name__}: {err}")
        return []
    listed: Iterable[ListedImage] = (ListedImage(path, index) for path, index in images)
    if limit:
        listed = spread_over_classes(listed, limit, num_classes)
    return list(listed)


def _read(fs: pafs.FileSystem, item: ListedImage, counts: FailureCounts) -> Sample | None:
    """The image file as a sample, or None (counted) when it is missing or empty."""
    key = basename(item.path)
    try:
        with fs.open_input_stream(item.path) as stream:
            image = stream.read()
    except OSError as err:
        counts.reject(FailureReason.MISSING_IMAGE, item.path, key, f"{type(err).__name__}: {err}")
        return None
    if not image:
        counts.reject(FailureReason.ZERO_BYTE_IMAGE, item.path, key, "0 bytes")
        return None
    counts.accept()
    return Sample(key=key, image=image, caption="", image_ext=item.path.rsplit(".", 1)[-1].lower(),
                  source=item.path)


def image_batches(root: str, items: list[ListedImage], preprocess: Preprocessor, batch_size: int,
                  counts: FailureCounts) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalised images [B, 3, S, S], class indices [B]) of `items`; bad images skipped and counted."""
    fs, _ = resolve(root)
    listed = iter(items)
    while chunk := list(itertools.islice(listed, batch_size)):
        kept, images = [], []
        for item in chunk:
            sample = _read(fs, item, counts)
            if sample is None:
                continue
            try:
                images.append(preprocess.image(sample))
                kept.append(item.class_index)
            except BadSample as bad:  # skipped and counted, like every bad input
                counts.reject(bad.reason, sample.source, sample.key, bad.detail)
        if images:
            pixels = np.stack(images).transpose(0, 3, 1, 2)
            yield torch.from_numpy(normalize(pixels)), torch.tensor(kept)
