"""The data section: sources, Ray Data preprocessing, and the drawn demo data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from clip_ray.config.dataclass_io import check


@dataclass
class SourceConfig:
    """One image-text source. Several train sources are mixed by `weight`."""

    # webdataset/parquet: shard pattern(s) ("shards/{00000..00127}.tar"), a directory or a URI.
    # csv/coco: the folder holding the captions file and the images.
    path: str = ""
    format: Literal["webdataset", "parquet", "csv", "coco"] = "webdataset"
    weight: float = 1.0
    # parquet column names
    image_column: str = "image"
    caption_column: str = "caption"
    # csv / coco layout, relative to `path`
    captions_file: str = "captions.csv"
    images_dir: str = "images"
    # optional file of image names to keep (e.g. Flickr8k's splits/train.txt)
    split_file: str | None = None

    def validate(self, key: str) -> None:
        check(bool(self.path), f"{key}.path", self.path, "is required")
        check(self.weight > 0, f"{key}.weight", self.weight, "must be positive")


@dataclass
class DataConfig:
    """Where the pairs come from and how Ray Data prepares them for the workers."""

    train: list[SourceConfig] = field(default_factory=list)
    # Held-out pairs for validation loss and retrieval recall.
    val: list[SourceConfig] = field(default_factory=list)
    # An ImageFolder (one folder per class name) for zero-shot accuracy.
    zeroshot_dir: str | None = None
    # A trained tokenizer.json, CLIP's bpe_simple_vocab_16e6.txt.gz, or 'bpe:N': a byte-level
    # BPE of at most N tokens trained on the train captions by the driver before the workers
    # start, kept under <cluster.storage_path>/tokenizers/ and reused (clip_ray.driver.prepare).
    tokenizer: str = ""
    # Random-resized-crop area range for training; evaluation resizes and centre-crops.
    crop_scale: tuple[float, float] = (0.9, 1.0)
    # Ship uint8 pixels to the workers and normalise there (4x less object-store traffic).
    uint8_images: bool = False
    seed: int = 0
    # Rows held by the local shuffle buffer behind the per-epoch shard shuffle.
    shuffle_buffer: int = 2048
    # Decompression-bomb guard: images with more pixels are skipped and counted.
    max_pixels: int = 64_000_000
    # Stop with an error naming the source when more than this fraction of samples fails.
    max_failure_fraction: float = 0.1
    # Ray Data preprocessing: rows per map_batches call and CPUs per preprocessing task.
    preprocess_batch_size: int = 256
    preprocess_num_cpus: float = 1.0
    # Ray Data's own progress (rows per operator, backpressure, resources in use) printed into the
    # job log this often, from rank 0's stream; 0 turns it off.
    progress_log_every_s: int = 60

    def validate(self, key: str = "data") -> None:
        for i, source in enumerate(self.train):
            source.validate(f"{key}.train[{i}]")
        for i, source in enumerate(self.val):
            source.validate(f"{key}.val[{i}]")
        low, high = self.crop_scale
        check(0 < low <= high <= 1, f"{key}.crop_scale", self.crop_scale, "must satisfy 0 < low <= high <= 1")
        check(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", self.shuffle_buffer, "must be >= 0")
        check(self.max_pixels > 0, f"{key}.max_pixels", self.max_pixels, "must be positive")
        check(0 <= self.max_failure_fraction <= 1, f"{key}.max_failure_fraction",
               self.max_failure_fraction, "must be in [0, 1]")
        check(self.preprocess_batch_size > 0, f"{key}.preprocess_batch_size", self.preprocess_batch_size,
               "must be positive")
        check(self.preprocess_num_cpus > 0, f"{key}.preprocess_num_cpus", self.preprocess_num_cpus,
               "must be positive")
        check(self.progress_log_every_s >= 0, f"{key}.progress_log_every_s", self.progress_log_every_s,
              "must be >= 0")


# The words the demo scenes can draw (clip_ray.data.demo.scenes keys its tables by them).
DEMO_COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
DEMO_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "diamond")


@dataclass
class DemoDataConfig:
    """Drawn demo data (clip_ray.data.demo.synthetic): the same config always gives the same bytes.

    Classes are colour x shape pairs; some are held out of training so zero-shot
    accuracy on them measures composition of words seen only apart.
    """

    seed: int = 0
    image_size: int = 64
    num_train: int = 20000
    # Retrieval pairs from all combinations, held-out ones included; never in training.
    num_val: int = 1000
    # Images per class in each zero-shot ImageFolder (held-out and seen combinations).
    num_zeroshot_per_class: int = 50
    samples_per_shard: int = 1000
    colours: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
    # Latin square: colour i loses shapes i, i+1, ... (mod the number of shapes).
    held_out_per_colour: int = 2
    # Explicit held-out classes ("red star"); when given they replace the Latin square.
    held_out: tuple[str, ...] = ()
    jpeg_quality: int = 90
    # Processes that draw the data (0: one per CPU, at most 8); the bytes do not depend on it.
    # More than one spawns a pool, so a calling script needs an `if __name__ == "__main__":` guard.
    num_workers: int = 1

    def combos(self) -> list[tuple[str, str]]:
        return [(colour, shape) for colour in self.colours for shape in self.shapes]

    def held_out_classes(self) -> list[str]:
        """Sorted class names ("red circle") kept out of training."""
        if self.held_out:
            return sorted(self.held_out)
        n = len(self.shapes)
        return sorted(f"{colour} {self.shapes[(i + j) % n]}"
                      for i, colour in enumerate(self.colours) for j in range(self.held_out_per_colour))

    def seen_combos(self) -> list[tuple[str, str]]:
        """The combinations training may show."""
        held_out = set(self.held_out_classes())
        return [(colour, shape) for colour, shape in self.combos() if f"{colour} {shape}" not in held_out]

    def validate(self, key: str = "demo") -> None:
        check(16 <= self.image_size <= 512, f"{key}.image_size", self.image_size, "must be in [16, 512]")
        for name in ("num_train", "num_val", "num_zeroshot_per_class", "samples_per_shard"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.num_workers >= 0, f"{key}.num_workers", self.num_workers, "must be 0 (one per CPU) or more")
        check(1 <= self.jpeg_quality <= 100, f"{key}.jpeg_quality", self.jpeg_quality, "must be in [1, 100]")
        for name, known in (("colours", DEMO_COLOURS), ("shapes", DEMO_SHAPES)):
            names = getattr(self, name)
            check(len(names) >= 2 and set(names) <= set(known) and len(set(names)) == len(names),
                   f"{key}.{name}", names, f"need two or more distinct names from {', '.join(known)}")
        check(0 <= self.held_out_per_colour < len(self.shapes), f"{key}.held_out_per_colour",
               self.held_out_per_colour, "must leave every colour at least one shape in training")
        classes = {f"{colour} {shape}" for colour, shape in self.combos()}
        unknown = [name for name in self.held_out if name not in classes]
        check(not unknown, f"{key}.held_out", unknown, "are not colour-shape classes of this config")
        check(bool(self.held_out_classes()), f"{key}.held_out", self.held_out,
               "holds out nothing, so nothing tests generalisation")
        seen = self.seen_combos()
        check({c for c, _ in seen} == set(self.colours) and {s for _, s in seen} == set(self.shapes),
               f"{key}.held_out", self.held_out_classes(), "must leave every colour and every shape in training")
