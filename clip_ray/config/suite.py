"""An evaluation suite (`clip-ray eval MODEL --suite SUITE.yaml`): named tasks run on one model.

Three task types, the CLIP paper's protocol:

- `zeroshot`: labelled images, class names and prompt templates; top-1, top-5, mean per-class recall;
- `linear_probe`: logistic regression on frozen image features of a train and a test split (or one
  ImageFolder split in a fixed, stratified, seeded way), full and k-shot;
- `retrieval`: images with one or several captions each (a captions CSV, COCO JSON, or pairs in
  WebDataset / Parquet); R@k both ways, an image found when any of its captions is.

Labelled images are an ImageFolder (the class is the folder) or an image-text source whose
caption (or a key of its JSON metadata) is the label: a class name, or an index into the
task's class names.

Relative local paths resolve against the working directory of the process that loads the
suite (the repository root when run as the README shows), as a training config's do. The
loader is strict like every config: an unknown key or a wrong type is a ConfigError naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clip_ray.config.data import SourceConfig
from clip_ray.config.dataclass_io import ConfigError, apply_override, check, from_dict, load_yaml
from clip_ray.config.embed import EMBED_PRECISIONS

TASK_TYPES = ("zeroshot", "linear_probe", "retrieval")
DEFAULT_EXPERIMENT = "clip-ray-eval"


@dataclass
class SuiteDefaults:
    """How features are computed, for every task: the encoder actors as `clip-ray embed` runs them."""

    # Rows per encoder call (and per preprocessed block).
    batch_size: int = 256
    # Encoder actors (each loads the model once). null: as many as the cluster's GPUs hold (one per
    # num_gpus_per_actor), else one per num_cpus_per_actor + decode_cpus of its CPUs.
    concurrency: int | None = None
    # A GPU share per actor (0.25 puts four on a GPU). null: one GPU each when the cluster has GPUs, else none.
    num_gpus_per_actor: float | None = None
    num_cpus_per_actor: float = 1.0
    # CPUs of one read + decode task.
    decode_cpus: float = 1.0
    # Autocast of the encoder: auto is fp16 on a GPU, fp32 on a CPU.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # Images (or captions) per Ray Data read task.
    samples_per_partition: int = 2000
    # Images with more pixels are skipped and counted.
    max_pixels: int = 64_000_000
    # A task fails when more of its input is bad than this (skipped images are always counted).
    max_failure_fraction: float = 0.1
    # MLflow experiment of the evaluation runs (the command line's --experiment wins).
    experiment: str = DEFAULT_EXPERIMENT
    # Features reach the metrics as float32 (not a setting: the encoder's output type).
    dtype: str = field(default="float32", init=False)

    def validate(self, key: str = "defaults") -> None:
        for name in ("batch_size", "samples_per_partition", "max_pixels"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.concurrency is None or self.concurrency > 0, f"{key}.concurrency", self.concurrency,
              "must be positive (or null: from the cluster's resources)")
        gpus = self.num_gpus_per_actor
        check(gpus is None or gpus >= 0, f"{key}.num_gpus_per_actor", gpus, "must be >= 0")
        check(gpus is None or gpus <= 1 or float(gpus).is_integer(), f"{key}.num_gpus_per_actor", gpus,
              "above 1 must be a whole number of GPUs")
        for name in ("num_cpus_per_actor", "decode_cpus"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.precision in EMBED_PRECISIONS, f"{key}.precision", self.precision,
              f"must be one of {EMBED_PRECISIONS}")
        check(0 <= self.max_failure_fraction <= 1, f"{key}.max_failure_fraction", self.max_failure_fraction,
              "must be in [0, 1]")
        check(bool(self.experiment), f"{key}.experiment", self.experiment, "is required")


@dataclass
class LabelledImages:
    """An ImageFolder (class = folder), or an image-text source whose caption or metadata holds the label."""

    image_folder: str | None = None
    source: SourceConfig | None = None
    # For a source: "caption" (the caption is the class name or index) or "meta.KEY" (a key of its JSON metadata).
    label: str = "caption"
    # At most this many images per class (an ImageFolder's first ones in listing order; a source's first read).
    max_per_class: int | None = None

    def validate(self, key: str) -> None:
        check((self.image_folder is None) != (self.source is None), f"{key}.image_folder", self.image_folder,
              "give exactly one of image_folder and source")
        check(self.image_folder is None or bool(self.image_folder), f"{key}.image_folder", self.image_folder,
              "must be a folder")
        if self.source is not None:
            self.source.validate(f"{key}.source")
        check(self.label == "caption" or (self.label.startswith("meta.") and len(self.label) > 5),
              f"{key}.label", self.label, "must be 'caption' or 'meta.KEY'")
        check(self.max_per_class is None or self.max_per_class > 0, f"{key}.max_per_class", self.max_per_class,
              "must be positive")

    def paths(self) -> list[str]:
        return [self.image_folder] if self.image_folder is not None else [self.source.path]


@dataclass
class ZeroShotTask:
    """Zero-shot classification: each class's prompts averaged into a classifier (clip_ray.eval.zeroshot)."""

    name: str = ""
    type: Literal["zeroshot"] = "zeroshot"
    images: LabelledImages = field(default_factory=LabelledImages)
    # A named set (cifar10, cifar100, imagenet), a file (one per line) or a list; default: the folder names, sorted.
    class_names: str | list[str] | None = None
    # A named set (cifar, imagenet80, simple, demo), a file (one "{}" template per line) or a list.
    templates: str | list[str] = "simple"

    def validate(self, key: str) -> None:
        self.images.validate(f"{key}.images")
        check(bool(self.templates), f"{key}.templates", self.templates, "needs at least one template")


@dataclass
class LinearProbeTask:
    """Logistic regression on frozen image features (clip_ray.eval.linear_probe), full and k-shot."""

    name: str = ""
    type: Literal["linear_probe"] = "linear_probe"
    # Either a train and a test split...
    train: LabelledImages | None = None
    test: LabelledImages | None = None
    # ...or one ImageFolder split per class, fixed by `seed`: train_fraction of each class trains, the rest tests.
    images: LabelledImages | None = None
    train_fraction: float = 0.5
    seed: int = 0
    # k-shot probes (k training images per class) besides the full one.
    shots: list[int] = field(default_factory=list)
    # Inverse regularisation strengths swept on a validation part of the train split (default: the probe's grid).
    c_grid: list[float] | None = None
    val_fraction: float = 0.2
    max_iter: int = 1000
    class_names: str | list[str] | None = None

    def validate(self, key: str) -> None:
        split = self.images is not None
        check(split != (self.train is not None or self.test is not None), f"{key}.images", self.images,
              "give either images (split by train_fraction) or both train and test")
        if split:
            self.images.validate(f"{key}.images")
            check(self.images.image_folder is not None, f"{key}.images.source", self.images.source,
                  "a fixed split needs an image_folder; give train and test for sources")
            check(0 < self.train_fraction < 1, f"{key}.train_fraction", self.train_fraction, "must be in (0, 1)")
        else:
            check(self.train is not None and self.test is not None, f"{key}.train", self.train,
                  "needs both train and test")
            self.train.validate(f"{key}.train")
            self.test.validate(f"{key}.test")
        check(all(k > 0 for k in self.shots) and len(set(self.shots)) == len(self.shots), f"{key}.shots",
              self.shots, "must be distinct positive numbers of images per class")
        check(self.c_grid is None or (bool(self.c_grid) and all(c > 0 for c in self.c_grid)), f"{key}.c_grid",
              self.c_grid, "must be positive numbers")
        check(0 < self.val_fraction < 1, f"{key}.val_fraction", self.val_fraction, "must be in (0, 1)")
        check(self.max_iter > 0, f"{key}.max_iter", self.max_iter, "must be positive")

    def image_sets(self) -> list[LabelledImages]:
        return [self.images] if self.images is not None else [self.train, self.test]


@dataclass
class RetrievalTask:
    """Image-text retrieval with several captions per image (clip_ray.eval.retrieval)."""

    name: str = ""
    type: Literal["retrieval"] = "retrieval"
    # A folder of images with a captions CSV or COCO JSON (format csv or coco; split_file keeps the images it
    # lists), or WebDataset / Parquet pairs (a pair's image is its metadata's "image", else its own).
    source: SourceConfig = field(default_factory=lambda: SourceConfig(format="csv"))
    # csv / coco: at most this many images (the first of the split), with all their captions.
    max_images: int | None = None
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])

    def validate(self, key: str) -> None:
        self.source.validate(f"{key}.source")
        check(self.max_images is None or self.max_images > 0, f"{key}.max_images", self.max_images,
              "must be positive")
        check(self.max_images is None or self.source.format in ("csv", "coco"), f"{key}.max_images",
              self.max_images, "applies to csv / coco sources (their images are listed before reading)")
        check(bool(self.recall_at) and all(k > 0 for k in self.recall_at), f"{key}.recall_at", self.recall_at,
              "must be positive")


Task = ZeroShotTask | LinearProbeTask | RetrievalTask
TASK_CLASSES: dict[str, type] = {"zeroshot": ZeroShotTask, "linear_probe": LinearProbeTask,
                                 "retrieval": RetrievalTask}


@dataclass
class SuiteConfig:
    """A named list of tasks and the defaults they run with."""

    name: str = ""
    defaults: SuiteDefaults = field(default_factory=SuiteDefaults)
    tasks: list[Task] = field(default_factory=list)

    def validate(self) -> None:
        check(bool(self.name) and "/" not in self.name, "name", self.name, "is required (and holds no '/')")
        self.defaults.validate()
        check(bool(self.tasks), "tasks", self.tasks, "needs at least one task")
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            key = task_key(i, task)
            check(bool(task.name) and "/" not in task.name, f"{key}.name", task.name,
                  "is required (and holds no '/': it starts each metric's name)")
            check(task.name not in seen, f"{key}.name", task.name, "is used by an earlier task")
            seen.add(task.name)
            task.validate(key)


def task_key(index: int, task) -> str:
    """How errors name a task: its place and its name (`task` a task or its dict)."""
    name = task.get("name") if isinstance(task, dict) else getattr(task, "name", "")
    return f"tasks[{index}]" + (f" ({name})" if name else "")


def _task_from_dict(data, index: int) -> Task:
    key = task_key(index, data)
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={data!r}: expected a mapping with a name and a type")
    kind = data.get("type")
    if kind not in TASK_CLASSES:
        raise ConfigError(f"{key}.type={kind!r}: must be one of {', '.join(TASK_TYPES)}")
    return from_dict(TASK_CLASSES[kind], data, key)


def suite_from_dict(data: dict) -> SuiteConfig:
    """A checked SuiteConfig from a nested dict (each task built as the class its `type` names)."""
    data = dict(data)
    tasks = data.pop("tasks", [])
    if not isinstance(tasks, list):
        raise ConfigError(f"tasks={tasks!r}: expected a list of tasks")
    suite = from_dict(SuiteConfig, data)
    suite.tasks = [_task_from_dict(task, i) for i, task in enumerate(tasks)]
    suite.validate()
    return suite


def _apply_suite_override(data: dict, assignment: str) -> None:
    """`key=value` as for any config, where `tasks.NAME.key=value` reaches into the task named NAME."""
    dotted = assignment.split("=", 1)[0]
    parts = dotted.split(".")
    if parts[0] != "tasks" or len(parts) < 3:
        apply_override(data, assignment)
        return
    tasks = data.get("tasks") or []
    task = next((t for t in tasks if isinstance(t, dict) and t.get("name") == parts[1]), None)
    if task is None:
        names = [t.get("name") for t in tasks if isinstance(t, dict)]
        raise ConfigError(f"{dotted}: no task named {parts[1]!r} (tasks: {', '.join(map(str, names))})")
    apply_override(task, assignment[len(f"tasks.{parts[1]}."):])


def load_suite(path: str | Path, overrides: list[str] = ()) -> SuiteConfig:
    """SUITE.yaml + `--set` overrides (`defaults.batch_size=64`, `tasks.NAME.images.max_per_class=20`)."""
    data = load_yaml(path)
    for assignment in overrides:
        _apply_suite_override(data, assignment)
    return suite_from_dict(data)
