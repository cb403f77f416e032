"""A task's features, computed by the encoder actor pool and returned to the driver in input order.

The images (or captions) are cut into partitions as `clip-ray embed` cuts them and run through
the same Ray Data pipeline (clip_ray.inference.pipeline: read + decode tasks, then ClipEncoder
actors with their CPU or GPU share), with the same eval preprocessing (centre square, bicubic, to
the model's image size) as the training-time evaluation. Nothing is written: each partition's
rows come back as they complete and are put in input order here. Bad images are skipped and
counted in the returned FailureCounts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs

from clip_ray.config import ConfigError, SourceConfig
from clip_ray.config.suite import LabelledImages
from clip_ray.data.formats import FailureCounts, FailureReason, list_image_folder
from clip_ray.data.offline.partitions import Partition, plan_partitions
from clip_ray.inference.encoder import EMBEDDING_COLUMNS
from clip_ray.inference.models import ResolvedModel
from clip_ray.inference.partitions import EmbedPartition
from clip_ray.inference.pipeline import EncoderSettings, encode_partitions, stacked
from clip_ray.storage import basename, resolve

# A placeholder class of images listed without one (a retrieval set's photos).
UNLABELLED = "image"


@dataclass
class Encoded:
    """Rows in input order: the row fields asked for, the embeddings [N, D] float32, and what was skipped."""

    columns: dict[str, np.ndarray]
    counts: FailureCounts

    def __len__(self) -> int:
        return len(self.columns["position"])

    def embeddings(self, tower: str = "image") -> np.ndarray:
        return np.array(self.columns[EMBEDDING_COLUMNS[tower]], dtype=np.float32)  # a writable copy for torch


def encode(partitions: list[EmbedPartition], model: ResolvedModel, settings: EncoderSettings, *,
           source: SourceConfig | None = None, towers: tuple[str, ...] = ("image",),
           columns: tuple[str, ...] = ("key", "label", "source"), counts: FailureCounts | None = None) -> Encoded:
    """Runs the pipeline over `partitions` and concatenates them in partition order."""
    counts = counts if counts is not None else FailureCounts()
    by_index = {}
    for index, rows, partition_counts in encode_partitions(partitions, model, settings, source=source,
                                                           towers=towers, columns=columns):
        for tower in towers:
            rows[EMBEDDING_COLUMNS[tower]] = stacked(rows[EMBEDDING_COLUMNS[tower]], model.model_config.embed_dim)
        by_index[index] = rows
        counts.merge(partition_counts)
    names = ("position", *columns, *(EMBEDDING_COLUMNS[tower] for tower in towers))
    empty = {name: np.empty((0, model.model_config.embed_dim)) if name.endswith("_embedding") else np.empty(0)
             for name in names}
    parts = [by_index[index] for index in sorted(by_index)] or [empty]
    return Encoded({name: np.concatenate([part[name] for part in parts]) for name in names}, counts)


def listed_partitions(folder: str, listed: list[tuple[str, int]], classes: list[str],
                      size: int) -> list[EmbedPartition]:
    """Listed images (paths inside the folder's filesystem, class indices) cut into runs of `size`."""
    return [EmbedPartition(index=i, images=listed[start:start + size], classes=classes, image_folder=folder)
            for i, start in enumerate(range(0, len(listed), size))]


def list_folder(folder: str, key: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) of an ImageFolder; a ConfigError naming `key` when it cannot be listed."""
    try:
        classes, listed = list_image_folder(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={folder!r}: cannot list this ImageFolder ({type(err).__name__}: {err})") from None
    if not classes or not listed:
        raise ConfigError(f"{key}={folder!r}: an ImageFolder needs class subfolders holding images; found none")
    return classes, listed


def list_classes(folder: str, key: str) -> list[str]:
    """An ImageFolder's classes (its direct subfolders, sorted, as list_image_folder names them) without listing
    the images: the check before Ray starts stays cheap on ImageNet's 1.28M training files."""
    try:
        fs, inner = resolve(folder)
        infos = fs.get_file_info(pafs.FileSelector(inner.rstrip("/"), recursive=False))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={folder!r}: cannot list this ImageFolder ({type(err).__name__}: {err})") from None
    classes = sorted(basename(info.path) for info in infos if info.type == pafs.FileType.Directory)
    if not classes:
        raise ConfigError(f"{key}={folder!r}: an ImageFolder needs one subfolder per class; found none")
    return classes


def first_per_class(listed: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """At most `limit` items of each class, the first in listing order."""
    if not limit:
        return list(listed)
    taken: dict[int, int] = {}
    kept = []
    for path, class_index in listed:
        if taken.get(class_index, 0) < limit:
            taken[class_index] = taken.get(class_index, 0) + 1
            kept.append((path, class_index))
    return kept


def _source_label(row_caption: str, row_meta: str, label: str) -> str | None:
    if label == "caption":
        return row_caption or None
    value = json.loads(row_meta).get(label[len("meta."):]) if row_meta else None
    return None if value is None else str(value)


def encode_labelled_source(images: LabelledImages, model: ResolvedModel, settings: EncoderSettings,
                           samples_per_partition: int) -> tuple[Encoded, list[str]]:
    """The images of a labelled source, with each row's label text in column "label" (rows without one are
    dropped and counted as missing_caption); also returns the sorted distinct labels."""
    counts = FailureCounts()
    partitions = [EmbedPartition(index=p.index, pairs=p)
                  for p in plan_partitions(images.source, samples_per_partition, counts)]
    encoded = encode(partitions, model, settings, source=images.source, columns=("key", "caption", "meta", "source"),
                     counts=counts)
    labels = [_source_label(caption, meta, images.label)
              for caption, meta in zip(encoded.columns["caption"], encoded.columns["meta"])]
    keep = np.array([label is not None for label in labels], dtype=bool)
    for key in encoded.columns["key"][~keep]:
        counts.reject(FailureReason.MISSING_CAPTION, images.source.path, str(key), f"no {images.label}")
    counts.ok -= int((~keep).sum())
    columns = {name: column[keep] for name, column in encoded.columns.items()}
    columns["label"] = np.array([label for label in labels if label is not None], dtype=object)
    return Encoded(columns, counts), sorted(set(columns["label"].tolist()))


def caption_table_partitions(source: SourceConfig, max_images: int | None, samples_per_partition: int,
                             counts: FailureCounts) -> tuple[list[Partition], list[str]]:
    """The caption table's partitions (whole images each), cut after `max_images` images, and the image names."""
    partitions = plan_partitions(source, samples_per_partition, counts)
    names: list[str] = []
    kept = []
    for partition in partitions:
        room = len(partition.images) if max_images is None else max_images - len(names)
        if room <= 0:
            break
        partition.images = partition.images[:room]
        names += [name for name, _ in partition.images]
        kept.append(partition)
    return kept, names


def image_partitions(images_dir: str, names: list[str], size: int) -> tuple[list[EmbedPartition], dict[str, str]]:
    """Partitions that read each named image once (as an unlabelled ImageFolder listing does), and
    {path inside the filesystem: image name} to tie the rows back to the names."""
    _, root = resolve(images_dir)
    paths = {f"{root.rstrip('/')}/{name}": name for name in names}
    return listed_partitions(images_dir, [(path, 0) for path in paths], [UNLABELLED], size), paths
