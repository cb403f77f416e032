"""The three task types of an evaluation suite, each: features from the actor pool, then the shared metrics.

The metrics are the functions the evaluation during training calls (clip_ray.eval.evaluate):
`zeroshot_classifier` + `zeroshot_accuracy` (classification_metrics: top-1, top-5, mean
per-class recall) and `retrieval_recall`; the probe is clip_ray.eval.linear_probe. A task
returns its metrics (names without the task prefix) and what it skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import ray
import torch

from clip_ray.config import ConfigError
from clip_ray.config.suite import LabelledImages, LinearProbeTask, RetrievalTask, SuiteDefaults, ZeroShotTask
from clip_ray.data.formats import FailureCounts, FailureReason
from clip_ray.data.offline.partitions import plan_partitions
from clip_ray.driver.suite.features import (
    caption_table_partitions, encode, encode_labelled_source, first_per_class, image_partitions,
    list_classes, list_folder, listed_partitions,
)
from clip_ray.eval.linear_probe import DEFAULT_C_GRID, linear_probe
from clip_ray.eval.retrieval import group_by_image, retrieval_recall
from clip_ray.eval.templates import resolve_class_names, resolve_templates
from clip_ray.eval.zeroshot import zeroshot_accuracy, zeroshot_classifier
from clip_ray.inference.encoder import ClipEncoder
from clip_ray.inference.models import ResolvedModel
from clip_ray.inference.partitions import EmbedPartition
from clip_ray.inference.pipeline import actor_resources


@dataclass
class TaskResult:
    """A task's metrics (e.g. {"top1": 0.4} or {"16shot/top1": ...}), its counts, and facts for the report."""

    metrics: dict[str, float]
    counts: FailureCounts
    info: dict = field(default_factory=dict)


@dataclass
class LabelledFeatures:
    features: np.ndarray  # [N, D] float32, unit rows
    labels: np.ndarray  # [N] indices into class_names
    class_names: list[str]
    counts: FailureCounts
    sources: np.ndarray  # [N] where each image was read from

    def subset(self, rows: np.ndarray, counts: FailureCounts) -> "LabelledFeatures":
        return LabelledFeatures(self.features[rows], self.labels[rows], self.class_names, counts, self.sources[rows])


# --------------------------------------------------------------------------- class names


def task_class_names(spec, found: list[str], key: str) -> list[str]:
    """The task's class names (`spec`: a named set, file or list; None: the names `found`), checked."""
    if spec is None:
        return list(found)
    try:
        return resolve_class_names(spec)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{key}.class_names={spec!r}: {err}") from None


def folder_label_map(folders: list[str], class_names: list[str], key: str) -> np.ndarray:
    """For each class folder, the index of its class name: the folder's own name when every folder is a class
    name (any order), else the i-th name for the i-th sorted folder (ImageNet's wnid folders) when the counts
    agree; anything else is a ConfigError naming the task's class_names."""
    index = {name: i for i, name in enumerate(class_names)}
    if set(folders) == set(class_names):
        return np.array([index[name] for name in folders])
    if len(folders) == len(class_names) and not set(folders) & set(class_names):
        return np.arange(len(folders))
    unknown = sorted(set(folders) - set(class_names))
    shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    raise ConfigError(f"{key}.class_names: {len(class_names)} names do not match the {len(folders)} class folders "
                      f"(folders that are not class names: {shown}); give the folder names themselves, "
                      "or as many names as folders in the folders' sorted order")


def source_label_index(labels: np.ndarray, class_names: list[str], key: str) -> np.ndarray:
    """Label texts (class names, or indices into class_names) as indices; an unknown one is a ConfigError."""
    index = {name: i for i, name in enumerate(class_names)}
    out = np.empty(len(labels), dtype=np.int64)
    for row, label in enumerate(labels):
        text = str(label).strip()
        if text in index:
            out[row] = index[text]
        elif text.isdigit() and int(text) < len(class_names):
            out[row] = int(text)
        else:
            raise ConfigError(f"{key}: label {text!r} is neither one of the {len(class_names)} class names "
                              "nor an index into them")
    return out


def check_task_class_names(images: LabelledImages, spec, key: str, field: str = "images") -> None:
    """The checks that need no Ray: the class names resolve and, for an ImageFolder, match its folders."""
    if images.image_folder is not None:
        folders = list_classes(images.image_folder, f"{key}.{field}.image_folder")
        folder_label_map(folders, task_class_names(spec, folders, key), key)
    elif spec is not None:
        task_class_names(spec, [], key)


# --------------------------------------------------------------------------- labelled images


def folder_features(folder: str, listed: list[tuple[str, int]], folders: list[str], class_names: list[str],
                    model: ResolvedModel, defaults: SuiteDefaults, key: str) -> LabelledFeatures:
    """Features of listed ImageFolder images, labelled by the task's class names."""
    label_of_folder = folder_label_map(folders, class_names, key)
    encoded = encode(listed_partitions(folder, listed, folders, defaults.samples_per_partition), model, defaults)
    folder_index = {name: i for i, name in enumerate(folders)}
    labels = label_of_folder[[folder_index[name] for name in encoded.columns["label"]]] if len(encoded) else []
    return LabelledFeatures(encoded.embeddings(), np.asarray(labels, dtype=np.int64), class_names, encoded.counts,
                            encoded.columns["source"])


def labelled_features(images: LabelledImages, spec, model: ResolvedModel, defaults: SuiteDefaults,
                      key: str, field: str = "images") -> LabelledFeatures:
    """Features and labels of a task's images (an ImageFolder or a labelled source), max_per_class applied."""
    if images.image_folder is not None:
        folders, listed = list_folder(images.image_folder, f"{key}.{field}.image_folder")
        class_names = task_class_names(spec, folders, key)
        return folder_features(images.image_folder, first_per_class(listed, images.max_per_class), folders,
                               class_names, model, defaults, key)
    encoded, found = encode_labelled_source(images, model, defaults, defaults.samples_per_partition)
    class_names = task_class_names(spec, found, key)
    labels = source_label_index(encoded.columns["label"], class_names, f"{key}.{field}.label")
    keep = np.array([row for row, _ in first_per_class(list(enumerate(labels.tolist())), images.max_per_class)],
                    dtype=np.int64)
    return LabelledFeatures(encoded.embeddings(), labels, class_names, encoded.counts,
                            encoded.columns["source"]).subset(keep, encoded.counts)


def _counted(result: LabelledFeatures, metrics: dict[str, float], info: dict) -> TaskResult:
    metrics = {**metrics, "num_images": float(len(result.labels)), "skipped_images": float(result.counts.num_failed)}
    return TaskResult(metrics, result.counts, {"num_classes": len(result.class_names), **info})


# --------------------------------------------------------------------------- zero-shot


def _classifier(model: ResolvedModel, class_names: list[str], templates: list[str], precision: str) -> np.ndarray:
    """The [D, C] zero-shot classifier, built where this runs (the driver, or a Ray task with a GPU share)."""
    encoder = ClipEncoder(model, towers=("text",), dtype="float32", precision=precision)
    context_length = model.model_config.text.context_length
    weights = zeroshot_classifier(lambda tokens: torch.from_numpy(encoder.encode_texts(tokens)),
                                  lambda texts: model.tokenizer(texts, context_length=context_length),
                                  class_names, templates)
    return weights.numpy()


def zeroshot_weights(model: ResolvedModel, class_names: list[str], templates: list[str],
                     defaults: SuiteDefaults) -> np.ndarray:
    """The classifier: where the actors have GPUs, from one Ray task with an actor's share (ImageNet's 80,000
    prompts take seconds there); on CPUs the prompts are encoded on the driver (a task would be another process
    loading the model, on the same kind of CPU)."""
    if not defaults.num_gpus_per_actor:
        return _classifier(model, class_names, templates, defaults.precision)
    task = ray.remote(**actor_resources(defaults))(_classifier)
    return ray.get(task.remote(model, class_names, templates, defaults.precision))


def run_zeroshot(task: ZeroShotTask, model: ResolvedModel, defaults: SuiteDefaults, key: str) -> TaskResult:
    try:
        templates = resolve_templates(task.templates)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{key}.templates={task.templates!r}: {err}") from None
    data = labelled_features(task.images, task.class_names, model, defaults, key)
    weights = zeroshot_weights(model, data.class_names, templates, defaults)
    metrics = {}
    if len(data.labels):
        metrics = zeroshot_accuracy(torch.from_numpy(data.features), torch.from_numpy(weights),
                                    torch.from_numpy(data.labels))
    return _counted(data, metrics, {"templates": len(templates)})


# --------------------------------------------------------------------------- linear probe


def stratified_split(listed: list[tuple[str, int]], train_fraction: float, seed: int,
                     max_per_class: int | None) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A fixed split of an ImageFolder listing: each class's images shuffled by (seed, class), cut to
    max_per_class, then train_fraction of them (at least one, and one left) to train; listing order kept."""
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in listed:
        by_class.setdefault(item[1], []).append(item)
    train, test = [], []
    for class_index, items in sorted(by_class.items()):
        order = np.random.default_rng([seed, class_index]).permutation(len(items))[:max_per_class or None]
        cut = min(max(1, round(train_fraction * len(order))), len(order) - 1)
        train += [items[i] for i in sorted(order[:cut])]
        test += [items[i] for i in sorted(order[cut:])]
    return train, test


def probe_splits(task: LinearProbeTask, model: ResolvedModel, defaults: SuiteDefaults,
                 key: str) -> tuple[LabelledFeatures, LabelledFeatures]:
    if task.images is None:
        train = labelled_features(task.train, task.class_names, model, defaults, key, "train")
        test = labelled_features(task.test, task.class_names or train.class_names, model, defaults, key, "test")
        return train, test
    folders, listed = list_folder(task.images.image_folder, f"{key}.images.image_folder")
    class_names = task_class_names(task.class_names, folders, key)
    train_listed, test_listed = stratified_split(listed, task.train_fraction, task.seed, task.images.max_per_class)
    # One pass over both splits; each row goes back to its split by the path it was read from.
    both = folder_features(task.images.image_folder, train_listed + test_listed, folders, class_names, model,
                           defaults, key)
    in_train = np.isin(both.sources, [path for path, _ in train_listed])
    return both.subset(np.flatnonzero(in_train), both.counts), both.subset(np.flatnonzero(~in_train), FailureCounts())


def run_linear_probe(task: LinearProbeTask, model: ResolvedModel, defaults: SuiteDefaults, key: str) -> TaskResult:
    train, test = probe_splits(task, model, defaults, key)
    num_classes = len(train.class_names)
    options = {"c_grid": tuple(task.c_grid or DEFAULT_C_GRID), "val_fraction": task.val_fraction,
               "seed": task.seed, "max_iter": task.max_iter, "num_classes": num_classes}
    metrics, info = {}, {}
    for shots in [*sorted(task.shots), None]:
        variant = f"{shots}shot" if shots is not None else "full"
        result = linear_probe(train.features, train.labels, test.features, test.labels, shots=shots, **options)
        metrics.update(result.metrics(f"{variant}/"))
        info[variant] = {"train_count": result.train_count, "test_count": result.test_count,
                         "val_top1": result.val_top1, "unconverged_fits": result.unconverged_fits}
    counts = FailureCounts().merge(train.counts).merge(test.counts)
    metrics.update({"num_train_images": float(len(train.labels)), "num_test_images": float(len(test.labels)),
                    "skipped_images": float(counts.num_failed)})
    return TaskResult(metrics, counts, {"num_classes": num_classes, "variants": info})


# --------------------------------------------------------------------------- retrieval


def run_retrieval(task: RetrievalTask, model: ResolvedModel, defaults: SuiteDefaults, key: str) -> TaskResult:
    if task.source.format in ("csv", "coco"):
        return _caption_table_retrieval(task, model, defaults, key)
    return _pair_retrieval(task, model, defaults, key)


def _pair_retrieval(task: RetrievalTask, model: ResolvedModel, defaults: SuiteDefaults, key: str) -> TaskResult:
    """Pairs of a shard source in one pass, grouped by image as the training-time evaluation groups them."""
    counts = FailureCounts()
    partitions = [EmbedPartition(index=p.index, pairs=p)
                  for p in plan_partitions(task.source, defaults.samples_per_partition, counts)]
    pairs = encode(partitions, model, defaults, source=task.source, towers=("image", "text"), columns=("key", "meta"),
                   counts=counts)
    image_ids = [_image_name(meta) or str(key) for key, meta in zip(pairs.columns["key"], pairs.columns["meta"])]
    first_rows, owners = group_by_image(image_ids)
    metrics = {}
    if first_rows:
        metrics = retrieval_recall(torch.from_numpy(pairs.embeddings("image")[first_rows]),
                                   torch.from_numpy(pairs.embeddings("text")), torch.tensor(owners),
                                   ks=tuple(task.recall_at))
    metrics.update({"num_images": float(len(first_rows)), "num_captions": float(len(owners)),
                    "skipped_images": float(counts.num_failed), "captions_dropped": 0.0})
    return TaskResult(metrics, counts)


def _caption_table_retrieval(task: RetrievalTask, model: ResolvedModel, defaults: SuiteDefaults,
                             key: str) -> TaskResult:
    """Each image encoded once, each caption once; captions of a skipped image are dropped and counted."""
    counts = FailureCounts()
    partitions, names = caption_table_partitions(task.source, task.max_images, defaults.samples_per_partition,
                                                 counts)
    if not names:
        raise ConfigError(f"{key}.source={task.source.path!r}: no images to retrieve ({counts.summary()})")
    images_dir = partitions[0].images_dir
    image_parts, name_of_path = image_partitions(images_dir, names, defaults.samples_per_partition)
    images = encode(image_parts, model, defaults, counts=counts)
    texts = encode([EmbedPartition(index=p.index, pairs=p) for p in partitions], model, defaults,
                   source=task.source, towers=("text",), columns=("key", "meta"), counts=FailureCounts())
    row_of_image = {name_of_path[path]: row for row, path in enumerate(images.columns["source"])}
    owners = [row_of_image.get(_image_name(meta)) for meta in texts.columns["meta"]]
    kept = np.array([owner is not None for owner in owners], dtype=bool)
    captions_dropped = int((~kept).sum())
    for caption_key in texts.columns["key"][~kept]:
        counts.reject(FailureReason.MISSING_IMAGE, task.source.path, str(caption_key), "its image was skipped")
    counts.merge(FailureCounts(failed=texts.counts.failed, examples=texts.counts.examples))
    text_features = texts.embeddings("text")[kept]
    owner_rows = torch.tensor([owner for owner in owners if owner is not None], dtype=torch.long)
    metrics = retrieval_recall(torch.from_numpy(images.embeddings()), torch.from_numpy(text_features), owner_rows,
                               ks=tuple(task.recall_at))
    metrics.update({"num_images": float(len(images)), "num_captions": float(len(owner_rows)),
                    "skipped_images": float(images.counts.num_failed), "captions_dropped": float(captions_dropped)})
    return TaskResult(metrics, counts)


def _image_name(meta: str) -> str | None:
    return json.loads(meta).get("image") if meta else None


TASK_RUNNERS = {"zeroshot": run_zeroshot, "linear_probe": run_linear_probe, "retrieval": run_retrieval}
