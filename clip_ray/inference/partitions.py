"""The embedding job's partitions: how the input is cut, and the Ray Data task that reads and preprocesses one.

A partition is what one output file holds. Image-text sources are cut as
`clip-ray data convert` cuts them (clip_ray.data.offline.partitions): one input shard
(tar or Parquet) is one partition, a caption table is cut into runs of whole images
holding about `samples_per_partition` captions. An ImageFolder is cut into runs of
`samples_per_partition` images in its listing order (class, then path). The plan is a
pure function of the input and the options, so a re-run finds the same partitions
under the same numbers.

`preprocess_partition` is the body of the read + decode stage (`map_batches` over
one partition per call, CPU tasks on any node): it reads the partition's samples in
their fixed order, numbers them (`position`), decodes and centre-crops the images
(`Preprocessor(train=False)`, uint8), tokenizes the captions, and yields blocks of
`batch_size` rows. A sample whose image does not decode is skipped and counted; the
partition's counts go to the `PartitionLedger` actor before its last rows are
yielded, so when the driver has as many rows of a partition as the ledger says it
emitted, the partition is complete. Positions make a retried task's repeats harmless.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import ray

from clip_ray.config import EmbedConfig, SourceConfig
from clip_ray.data.formats import BadSample, FailureCounts, FailureReason, Sample, list_image_folder
from clip_ray.data.formats.folders import read_listed_images
from clip_ray.data.offline.partitions import Partition, plan_partitions, read_partition
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.storage import join, resolve


@dataclass
class EmbedPartition:
    """One output file's share of the input: a partition of image-text pairs, or a run of ImageFolder images."""

    index: int
    pairs: Partition | None = None
    # ImageFolder: (image path inside its filesystem, class index), the class names, the folder as given.
    images: list[tuple[str, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    image_folder: str = ""

    def describe(self) -> str:
        """What the partition reads, for a file's metadata and log lines."""
        if self.pairs is not None:
            if self.pairs.shard is not None:
                return self.pairs.shard
            names = [name for name, _ in self.pairs.images]
            return f"{self.pairs.table} (images {names[0]} .. {names[-1]})" if names else self.pairs.table
        if not self.images:
            return self.image_folder
        return f"{self.image_folder} ({self.images[0][0]} .. {self.images[-1][0]})"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "EmbedPartition":
        data = json.loads(text)
        pairs = Partition(**data["pairs"]) if data["pairs"] is not None else None
        return cls(index=data["index"], pairs=pairs, images=[tuple(item) for item in data["images"]],
                   classes=data["classes"], image_folder=data["image_folder"])


def plan_embed_partitions(config: EmbedConfig, counts: FailureCounts) -> list[EmbedPartition]:
    """The partitions of the job's input, in a fixed order; problems found while planning go to `counts`."""
    if config.source is not None:
        return [EmbedPartition(index=p.index, pairs=p)
                for p in plan_partitions(config.source, config.samples_per_partition, counts)]
    try:
        classes, listed = list_image_folder(config.image_folder)
    except OSError as err:
        counts.reject(FailureReason.UNREADABLE_SHARD, config.image_folder, "", f"{type(err).__name__}: {err}")
        return []
    size = config.samples_per_partition
    return [EmbedPartition(index=i, images=listed[start:start + size], classes=classes,
                           image_folder=config.image_folder)
            for i, start in enumerate(range(0, len(listed), size))]


# --------------------------------------------------------------------------- reading one partition


@dataclass
class Row:
    """What an output row says about its sample, besides the embeddings."""

    key: str
    caption: str | None = None
    url: str | None = None
    label: str | None = None
    source: str = ""
    meta: str | None = None  # a pair's JSON metadata, as text (what a labelled source may keep its label in)


def _pair_row(sample: Sample, partition: Partition) -> Row:
    if partition.shard is None:  # a caption table: the image is a file of its own
        source = join(partition.images_dir, str(sample.meta.get("image", sample.key)))
    else:
        source = partition.shard
    url = sample.meta.get("url")
    return Row(key=sample.key, caption=sample.caption, url=str(url) if url is not None else None, source=source,
               meta=json.dumps(sample.meta) if sample.meta else None)


def _folder_samples(partition: EmbedPartition, counts: FailureCounts) -> Iterator[tuple[Sample, Row]]:
    fs, _ = resolve(partition.image_folder)
    for image in read_listed_images(partition.images, partition.classes, fs, counts):
        sample = Sample(key=image.key, image=image.image, caption="", image_ext=image.image_ext, source=image.source)
        yield sample, Row(key=image.key, label=image.class_name, source=image.source)


def partition_samples(partition: EmbedPartition, source: SourceConfig | None,
                      counts: FailureCounts) -> Iterator[tuple[Sample, Row]]:
    """(sample, its row) for each usable sample of the partition, in a fixed order; the rest are counted."""
    if partition.pairs is not None:
        return ((sample, _pair_row(sample, partition.pairs))
                for sample in read_partition(partition.pairs, source, counts))
    return _folder_samples(partition, counts)


def _block(rows: list[Row], positions: list[int], pixels: list[np.ndarray], tokens: np.ndarray | None,
           index: int, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    block = {"partition": np.full(len(rows), index, dtype=np.int64), "position": np.array(positions, dtype=np.int64)}
    for name in columns:  # "" for none in transit: a block of nothing but None would have Arrow's null type
        block[name] = np.array([getattr(row, name) or "" for row in rows], dtype=object)
    if pixels:
        block["image"] = np.stack(pixels).transpose(0, 3, 1, 2)
    if tokens is not None:
        block["text"] = tokens
    return block


def preprocess_partition(
    rows: dict[str, np.ndarray], *, source: SourceConfig | None, towers: tuple[str, ...], columns: tuple[str, ...],
    preprocessor: Preprocessor, batch_size: int, ledger: "ray.actor.ActorHandle",
) -> Iterator[dict[str, np.ndarray]]:
    """The read + decode task (see the module docstring): partition rows in, blocks of model inputs out."""
    for text in rows["partition"]:
        partition = EmbedPartition.from_json(str(text))
        read_counts, decode_counts = FailureCounts(), FailureCounts()
        numbered = enumerate(partition_samples(partition, source, read_counts))
        chunk = list(itertools.islice(numbered, batch_size))
        while True:
            following = list(itertools.islice(numbered, batch_size))
            kept, positions, pixels = [], [], []
            for position, (sample, row) in chunk:
                if "image" in towers:
                    try:
                        pixels.append(preprocessor.image(sample))
                    except BadSample as bad:
                        decode_counts.reject(bad.reason, sample.source, sample.key, bad.detail)
                        continue
                decode_counts.accept()
                kept.append(row)
                positions.append(position)
            if not following:  # recorded before the partition's last rows can reach the driver
                ray.get(ledger.report.remote(partition.index, read_counts.followed_by(decode_counts).to_dict()))
            if kept:
                tokens = preprocessor.text([row.caption for row in kept]) if "text" in towers else None
                yield _block(kept, positions, pixels, tokens, partition.index, columns)
            if not following:
                break
            chunk = following


@ray.remote(num_cpus=0)
class PartitionLedger:
    """Each partition's end-to-end counts (ok = rows emitted), reported by the task that read it;
    a retried task's report replaces the first. The driver takes the new ones as they come."""

    def __init__(self):
        self.new: dict[int, dict] = {}

    def report(self, index: int, counts: dict) -> None:
        self.new[int(index)] = counts

    def take(self) -> dict[int, dict]:
        new, self.new = self.new, {}
        return new
