"""Typed configuration for clip-ray, in one place.

One config object flows from YAML and `--set` overrides to every worker. The
loader is strict on purpose: an unknown key, a wrong type or an impossible
value is a one-line `ConfigError` naming the key, raised before any worker
starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clip_ray.dataclass_io import (  # noqa: F401  (re-exported: callers import them from here)
    ConfigError, apply_override, check, deep_merge, from_dict, load_yaml, to_dict,
)


# --------------------------------------------------------------------------- model


@dataclass
class VisionConfig:
    """Image tower. `arch` picks a Vision Transformer or CLIP's modified ResNet."""

    arch: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    # ViT: transformer width. ResNet: channels of the stem / first stage (64 for RN50).
    width: int = 768
    # ViT: number of residual blocks.
    layers: int = 12
    patch_size: int = 32
    # ResNet: bottleneck blocks per stage.
    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    # Attention heads are width // head_width (ResNet attention pool: 32 * width // head_width).
    head_width: int = 64
    mlp_ratio: float = 4.0
    # FLIP-style: fraction of patch tokens dropped at random while training (ViT only).
    patch_dropout: float = 0.0

    def validate(self, key: str = "model.vision") -> None:
        check(self.image_size > 0, f"{key}.image_size", self.image_size, "must be positive")
        check(self.width > 0, f"{key}.width", self.width, "must be positive")
        check(self.head_width > 0, f"{key}.head_width", self.head_width, "must be positive")
        check(0.0 <= self.patch_dropout < 1.0, f"{key}.patch_dropout", self.patch_dropout, "must be in [0, 1)")
        if self.arch == "vit":
            check(self.layers > 0, f"{key}.layers", self.layers, "must be positive")
            check(self.width % self.head_width == 0, f"{key}.width", self.width,
                   f"must be a multiple of head_width={self.head_width}")
            check(self.image_size % self.patch_size == 0, f"{key}.image_size", self.image_size,
                   f"must be a multiple of patch_size={self.patch_size}")
        else:
            check(all(n > 0 for n in self.resnet_layers), f"{key}.resnet_layers", self.resnet_layers,
                   "every stage needs at least one block")
            check(self.image_size % 32 == 0, f"{key}.image_size", self.image_size,
                   "must be a multiple of 32 for a ResNet")
            check((self.width * 32) % self.head_width == 0, f"{key}.width", self.width,
                   f"32 * width must be a multiple of head_width={self.head_width}")


@dataclass
class TextConfig:
    """Causal text Transformer over BPE tokens."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    # Features are read at the last position whose token is not the pad id.
    pad_token_id: int = 0

    def validate(self, key: str = "model.text") -> None:
        for name in ("context_length", "vocab_size", "width", "layers", "head_width"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.width % self.head_width == 0, f"{key}.width", self.width,
               f"must be a multiple of head_width={self.head_width}")


@dataclass
class ModelConfig:
    """A whole CLIP model: both towers plus the joint embedding and temperature."""

    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's released weights use QuickGELU; OpenCLIP's own trainings mostly GELU.
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    # The paper clips the learned temperature so logits are scaled by at most 100.
    max_logit_scale: float = math.log(100)
    # SigLIP's learnable logit bias (e.g. -10); None means the model has no bias parameter.
    init_logit_bias: float | None = None
    # Recompute each residual block in the backward pass (less memory, ~30% more compute).
    grad_checkpointing: bool = False

    def validate(self, key: str = "model") -> None:
        check(self.embed_dim > 0, f"{key}.embed_dim", self.embed_dim, "must be positive")
        check(self.init_logit_scale <= self.max_logit_scale, f"{key}.init_logit_scale",
               self.init_logit_scale, f"must not exceed max_logit_scale={self.max_logit_scale}")
        self.vision.validate(f"{key}.vision")
        self.text.validate(f"{key}.text")


# --------------------------------------------------------------------------- data


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
    # Tokenizer file: a trained tokenizer.json, or CLIP's bpe_simple_vocab_16e6.txt.gz.
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


@dataclass
class DemoDataConfig:
    """Drawn demo data (clip_ray.data.synthetic): the same config always gives the same bytes.

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
        # Imported here so this module stays importable without PIL; it knows the colour and shape words.
        from clip_ray.data.synthetic import HUES, SHAPE_WORDS

        check(16 <= self.image_size <= 512, f"{key}.image_size", self.image_size, "must be in [16, 512]")
        for name in ("num_train", "num_val", "num_zeroshot_per_class", "samples_per_shard"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.num_workers >= 0, f"{key}.num_workers", self.num_workers, "must be 0 (one per CPU) or more")
        check(1 <= self.jpeg_quality <= 100, f"{key}.jpeg_quality", self.jpeg_quality, "must be in [1, 100]")
        for name, known in (("colours", HUES), ("shapes", SHAPE_WORDS)):
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


# --------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """The optimisation run: what one step is and how many there are."""

    loss: Literal["clip", "siglip"] = "clip"
    # Pairs per optimiser step over all workers; every pair is a negative for every other.
    global_batch_size: int = 256
    # Micro-batches per step and worker. Negatives still span the whole global batch
    # (features are cached GradCache-style), so accumulation only saves memory.
    accumulation_steps: int = 1
    steps: int = 1000
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # AdamW with decoupled weight decay (not on gains, biases, embeddings, logit_scale),
    # linear warm-up then cosine decay to lr * min_lr_ratio: the paper's recipe.
    lr: float = 5e-4
    weight_decay: float = 0.2
    # None: the paper's values per image-tower family (ViT 0.9/0.98/1e-6, ResNet 0.9/0.999/1e-8).
    betas: tuple[float, float] | None = None
    eps: float | None = None
    warmup_steps: int = 2000
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value; None disables clipping.
    grad_clip_norm: float | None = None
    seed: int = 0
    compile: bool = False
    log_every: int = 10
    # 0 disables evaluation (or checkpoints) during training; both also happen at the end.
    eval_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # A non-finite loss skips the step; this many in a row stops the run.
    max_consecutive_nonfinite: int = 5

    def validate(self, key: str = "train") -> None:
        for name in ("global_batch_size", "accumulation_steps", "steps", "log_every", "keep_checkpoints",
                     "max_consecutive_nonfinite"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        for name in ("eval_every", "checkpoint_every", "warmup_steps", "weight_decay"):
            check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "must be >= 0")
        check(self.lr > 0, f"{key}.lr", self.lr, "must be positive")
        check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.betas is not None:
            check(all(0 <= b < 1 for b in self.betas), f"{key}.betas", self.betas, "must be in [0, 1)")
        if self.eps is not None:
            check(self.eps > 0, f"{key}.eps", self.eps, "must be positive")
        if self.grad_clip_norm is not None:
            check(self.grad_clip_norm > 0, f"{key}.grad_clip_norm", self.grad_clip_norm, "must be positive")


@dataclass
class EvalConfig:
    """Evaluation in the loop and after training."""

    # Validation loss is computed over batches of exactly this size, so runs compare.
    batch_size: int = 256
    # Cap on validation pairs read per evaluation (None: all of data.val).
    max_val_samples: int | None = 5000
    # A template set name (clip_ray.eval.templates.TEMPLATE_SETS) or a file, one "{}" template per line.
    zeroshot_templates: str = "simple"
    # A file of class names (one per line); None: the folder names of data.zeroshot_dir.
    zeroshot_class_names: str | None = None
    max_zeroshot_images: int | None = 10000
    recall_at: tuple[int, ...] = (1, 5, 10)

    def validate(self, key: str = "eval") -> None:
        check(self.batch_size > 0, f"{key}.batch_size", self.batch_size, "must be positive")
        check(all(k > 0 for k in self.recall_at), f"{key}.recall_at", self.recall_at, "must be positive")


@dataclass
class TrackingConfig:
    """MLflow, from rank 0 only. Training never stops because the server is away."""

    # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (artifacts in ./mlruns), resolved on the driver.
    tracking_uri: str | None = None
    experiment: str = "clip-ray"
    run_name: str | None = None
    # Set by sweeps: the run becomes a child of this run.
    parent_run_id: str | None = None
    # Register the final model under this name in the model registry.
    register_model_as: str | None = None
    log_system_metrics: bool = True
    # How long to wait before trying an unreachable server again.
    retry_interval_s: float = 30.0


@dataclass
class ClusterConfig:
    """Ray Train: how many workers, what each gets, where checkpoints live."""

    num_workers: int = 1
    use_gpu: bool = False
    # Fractions work and are what a 2-core laptop needs (Ray Data tasks need CPUs too).
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Local path or pyarrow URI (s3://, gs://); must be shared storage on a multi-node cluster.
    storage_path: str = "./runs"
    # The run's name under storage_path: re-submitting the same name resumes from its latest checkpoint.
    run_name: str = "clip-ray"
    # Start from scratch even when storage_path/run_name holds checkpoints (they are moved aside).
    fresh_start: bool = False
    # Ray Train restarts the worker group from the latest checkpoint this many times.
    max_failures: int = 0

    def validate(self, key: str = "cluster") -> None:
        check(self.num_workers > 0, f"{key}.num_workers", self.num_workers, "must be positive")
        check(self.cpus_per_worker > 0, f"{key}.cpus_per_worker", self.cpus_per_worker, "must be positive")
        check(self.max_failures >= -1, f"{key}.max_failures", self.max_failures, "must be >= -1 (-1: forever)")
        check(bool(self.run_name), f"{key}.run_name", self.run_name, "is required")


@dataclass
class Config:
    """Everything one training job needs. `demo` set: generate demo data and train on it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    demo: DemoDataConfig | None = None

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.eval.validate()
        self.cluster.validate()
        if self.demo is not None:
            self.demo.validate()
        else:
            check(bool(self.data.train), "data.train", self.data.train, "needs at least one source")
            check(bool(self.data.tokenizer), "data.tokenizer", self.data.tokenizer, "is required")
        per_step = self.cluster.num_workers * self.train.accumulation_steps
        check(self.train.global_batch_size % per_step == 0, "train.global_batch_size",
               self.train.global_batch_size,
               f"must be divisible by cluster.num_workers x train.accumulation_steps = {per_step}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file (optional) + `key.path=value` overrides -> a validated Config.

    `model` may name a preset and override some of its fields:
    `model: {preset: ViT-B/32, text: {vocab_size: 8192}}`.
    """
    data = load_yaml(path) if path else {}
    for assignment in overrides:
        apply_override(data, assignment)
    model = data.get("model")
    if isinstance(model, dict) and "preset" in model:
        from clip_ray.model.presets import get_preset  # the presets module imports this one

        try:
            base = to_dict(get_preset(model["preset"]))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"model.preset={model['preset']!r}: {err.args[0]}") from None
        overrides_of_preset = {k: v for k, v in model.items() if k != "preset"}
        data["model"] = deep_merge(base, overrides_of_preset)
    config = from_dict(Config, data)
    config.validate()
    return config
