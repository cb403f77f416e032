"""Demo data that needs no download: drawn scenes of coloured shapes with varied captions.

The scenes and their captions come from clip_ray.data.demo.scenes; this module turns
them into WebDataset shards for training and validation and ImageFolders for
zero-shot evaluation, and reuses a finished earlier run.

The class space is colour x shape. Some combinations are held out of training
(Latin-square style: each colour loses a few shapes, each shape a few colours), so
zero-shot accuracy on them measures composition: the model saw "red" and "star",
never a red star. Everything is a pure function of the seed: sample i of a split
has its own generator, so shards are byte-identical however they are produced.
"""

from __future__ import annotations

import fcntl
import io
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from clip_ray.config import DemoDataConfig
from clip_ray.data.demo.scenes import caption_scene, class_name, render_scene
from clip_ray.data.formats import ShardWriter

MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = "clip-ray-demo-1"
_SPLIT_CODES = {"train": 0, "val": 1, "zeroshot": 2}


@dataclass(frozen=True)
class DemoDataset:
    """Where a generated demo data set lives; paths are absolute."""

    root: str
    train_shards: list[str]
    val_shards: list[str]
    # ImageFolder of the held-out combinations: the zero-shot generalisation test.
    zeroshot_dir: str
    # ImageFolder of combinations seen in training, same count per class, for comparison.
    zeroshot_seen_dir: str
    # Held-out class names, sorted: the label order of `zeroshot_dir` as an ImageFolder.
    class_names: list[str]
    seen_class_names: list[str]
    # Zero-shot top-1 accuracy of guessing among `class_names`.
    chance_level: float
    manifest_path: str
    config: DemoDataConfig = field(repr=False)


def _identity(config: DemoDataConfig) -> dict:
    """The config fields that decide the bytes (not how many processes drew them), JSON-shaped."""
    fields = asdict(config)
    fields.pop("num_workers")
    return json.loads(json.dumps(fields))


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def draw_sample(config: DemoDataConfig, split: str, index: int, combos: list[tuple[str, str]]):
    """Sample `index` of `split` as (jpeg bytes, caption, attributes); a function of the seed alone.

    The colour-shape pair is drawn from `combos`: one pair forces it.
    """
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    combo = combos[int(rng.integers(len(combos)))]
    image, attributes = render_scene(rng, combo, config.image_size, config.colours)
    caption = caption_scene(rng, attributes)
    return _jpeg(image, config.jpeg_quality), caption, attributes


def _write_shard(task: tuple) -> list[str]:
    """Writes samples [start, stop) of a split as the shard numbered `shard_index`."""
    config, split, out_dir, shard_index, start, stop = task
    combos = config.seen_combos() if split == "train" else config.combos()
    with ShardWriter(out_dir, config.samples_per_shard, start_index=shard_index) as writer:
        for index in range(start, stop):
            image, caption, attributes = draw_sample(config, split, index, combos)
            writer.write(f"{split}{index:08d}", image, caption, meta=attributes)
    return writer.shards


def _write_class_folder(task: tuple) -> list[str]:
    """Writes the zero-shot images of one class into `folder/<class name>/NNNN.jpg`."""
    config, combo, folder = task
    class_dir = Path(folder) / class_name(*combo)
    class_dir.mkdir(parents=True, exist_ok=True)
    index_base = config.combos().index(combo) * config.num_zeroshot_per_class
    for k in range(config.num_zeroshot_per_class):
        image, _, _ = draw_sample(config, "zeroshot", index_base + k, [combo])
        (class_dir / f"{k:04d}.jpg").write_bytes(image)
    return [str(class_dir)]


def _run(tasks: list, num_workers: int) -> list:
    """Runs `(function, task)` pairs in order, in a pool of fresh processes when asked for more than one.

    Like any spawned pool, this re-imports the caller's main script in each child:
    a script calling it with num_workers != 1 needs an `if __name__ == "__main__":` guard.
    """
    if num_workers <= 1:
        return [function(task) for function, task in tasks]
    # spawn, not fork: the caller may be a Ray worker with threads that a fork would copy mid-lock.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        pending = [pool.apply_async(function, (task,)) for function, task in tasks]
        return [p.get() for p in pending]


def _load_manifest(root: Path, config: DemoDataConfig) -> DemoDataset | None:
    """The data set a finished earlier run left for this same config, else None."""
    try:
        manifest = json.loads((root / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("config") != _identity(config):
        return None
    absolute = {name: [str(root / p) for p in manifest[name]] for name in ("train_shards", "val_shards")}
    dirs = {name: str(root / manifest[name]) for name in ("zeroshot_dir", "zeroshot_seen_dir")}
    if not all(Path(p).is_file() for p in absolute["train_shards"] + absolute["val_shards"]):
        return None
    if not all(Path(d).is_dir() for d in dirs.values()):
        return None
    return DemoDataset(root=str(root), **absolute, **dirs, class_names=manifest["class_names"],
                       seen_class_names=manifest["seen_class_names"], chance_level=manifest["chance_level"],
                       manifest_path=str(root / MANIFEST_NAME), config=config)


def _shard_tasks(config: DemoDataConfig, split: str, count: int, out_dir: Path) -> list:
    step = config.samples_per_shard
    return [(_write_shard, (config, split, str(out_dir), i, start, min(start + step, count)))
            for i, start in enumerate(range(0, count, step))]


def generate_demo_data(out_dir: str | Path, config: DemoDataConfig | None = None) -> DemoDataset:
    """Draws train and val shards plus zero-shot ImageFolders under `out_dir`, or reuses them.

    The manifest is written last, by rename: its presence with the same config means
    a finished run, so a second call returns at once, and a crashed run is redone.
    A lock file keeps concurrent callers (say, several workers on one node) from
    drawing into the same directory at the same time.
    """
    config = config or DemoDataConfig()
    config.validate()
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _load_manifest(root, config)
        if found is not None:
            return found
        started = time.perf_counter()
        (root / MANIFEST_NAME).unlink(missing_ok=True)
        for part in ("train", "val", "zeroshot"):
            shutil.rmtree(root / part, ignore_errors=True)

        held_out = config.held_out_classes()
        seen = sorted(class_name(*c) for c in config.seen_combos())
        folders = {"unseen": root / "zeroshot" / "unseen", "seen": root / "zeroshot" / "seen"}
        shard_tasks = _shard_tasks(config, "train", config.num_train, root / "train")
        shard_tasks += _shard_tasks(config, "val", config.num_val, root / "val")
        folder_tasks = [(_write_class_folder, (config, c, str(folders["unseen" if class_name(*c) in held_out else "seen"])))
                        for c in config.combos()]
        workers = config.num_workers if config.num_workers > 0 else min(os.cpu_count() or 1, 8)
        results = _run(shard_tasks + folder_tasks, workers)
        shards = [Path(p).relative_to(root).as_posix() for done in results[: len(shard_tasks)] for p in done]
        manifest = {
            "format": _MANIFEST_FORMAT,
            "config": _identity(config),
            "train_shards": [p for p in shards if p.startswith("train/")],
            "val_shards": [p for p in shards if p.startswith("val/")],
            "zeroshot_dir": "zeroshot/unseen",
            "zeroshot_seen_dir": "zeroshot/seen",
            "class_names": held_out,
            "seen_class_names": seen,
            "chance_level": 1 / len(held_out),
            "generation_seconds": round(time.perf_counter() - started, 2),
        }
        temporary = root / f"{MANIFEST_NAME}.tmp"
        temporary.write_text(json.dumps(manifest, indent=2))
        os.replace(temporary, root / MANIFEST_NAME)
        return _load_manifest(root, config)
