"""The embedding job (`clip-ray embed`): what to read, which model, how the actors run, what to write.

The input is one image-text source (any format the project reads: WebDataset or
img2dataset tar shards, Parquet, a folder of images with a captions CSV or COCO
JSON) or an ImageFolder tree (images only; the class folder becomes each row's
label). The model is a training run's checkpoint, a checkpoint directory, a
model.pt or OpenAI-layout state dict file, or an MLflow model or run
(clip_ray.inference.models resolves it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clip_ray.config.data import SourceConfig
from clip_ray.config.dataclass_io import check

EMBED_TOWERS = ("both", "image", "text")
EMBED_DTYPES = ("float16", "float32")
EMBED_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class EmbedConfig:
    """One `clip-ray embed` job. Exactly one of `source` and `image_folder` is set."""

    # Folder (local or URI) for part-NNNNN.parquet, one file per input partition, and embed_stats.json.
    output: str = ""
    # A checkpoint or run directory, model.pt / state dict file, or MLflow URI (runs:/ID[/model], models:/...).
    model: str = ""
    # Image-text pairs to embed.
    source: SourceConfig | None = None
    # Or an ImageFolder tree (<class>/<image>): images only, the class name as each row's label.
    image_folder: str | None = None
    # The model's tokenizer file; default: the one its checkpoint's run or MLflow run recorded.
    tokenizer: str | None = None
    # MLflow server of an MLflow model source (default: $MLFLOW_TRACKING_URI).
    tracking_uri: str | None = None
    # Which towers to run: "both" writes image_embedding and text_embedding (an ImageFolder: image only).
    embed: Literal["both", "image", "text"] = "both"
    # The stored embeddings' type; they are computed in float32 (or under `precision`) and unit-normalised first.
    dtype: Literal["float16", "float32"] = "float16"
    # Autocast of the encoder: auto is fp16 on a GPU, fp32 on a CPU.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # Rows per encoder call (and per preprocessed block).
    batch_size: int = 256
    # Encoder actors (each loads the model once).
    concurrency: int = 1
    # Resources of one encoder actor; a fraction of a GPU puts several actors on one GPU.
    num_gpus_per_actor: float = 0.0
    num_cpus_per_actor: float = 1.0
    # CPUs of one read + decode task (Ray Data tasks, any node).
    decode_cpus: float = 1.0
    # Caption tables and ImageFolders are cut into partitions of about this many rows (shards are one each).
    samples_per_partition: int = 10_000
    # Images with more pixels are skipped and counted.
    max_pixels: int = 64_000_000
    # Redo partitions a previous run finished (default: skip them).
    overwrite: bool = False
    # Exit with an error when more of the input is bad than this (default: only when all of it is).
    max_failure_fraction: float = 1.0
    # A progress line in the job log this often.
    progress_every_s: float = 30.0
    # A plain state dict does not record its activation: OpenAI's weights use quick_gelu, OpenCLIP's gelu.
    state_dict_activation: Literal["quick_gelu", "gelu"] = "quick_gelu"

    def validate(self, key: str = "embed") -> None:
        check(bool(self.output), f"{key}.output", self.output, "is required")
        check(bool(self.model), f"{key}.model", self.model, "is required")
        check((self.source is None) != (self.image_folder is None), f"{key}.source", self.source,
              "give exactly one of a source of image-text pairs and an image_folder")
        if self.source is not None:
            self.source.validate(f"{key}.source")
        check(bool(self.image_folder) or self.image_folder is None, f"{key}.image_folder", self.image_folder,
              "must be a folder")
        check(self.embed in EMBED_TOWERS, f"{key}.embed", self.embed, f"must be one of {EMBED_TOWERS}")
        check(not (self.image_folder is not None and self.embed == "text"), f"{key}.embed", self.embed,
              "an ImageFolder has no captions to embed")
        check(self.dtype in EMBED_DTYPES, f"{key}.dtype", self.dtype, f"must be one of {EMBED_DTYPES}")
        check(self.precision in EMBED_PRECISIONS, f"{key}.precision", self.precision,
              f"must be one of {EMBED_PRECISIONS}")
        for name in ("batch_size", "concurrency", "samples_per_partition", "max_pixels"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.num_gpus_per_actor >= 0, f"{key}.num_gpus_per_actor", self.num_gpus_per_actor, "must be >= 0")
        check(self.num_gpus_per_actor <= 1 or float(self.num_gpus_per_actor).is_integer(),
              f"{key}.num_gpus_per_actor", self.num_gpus_per_actor, "above 1 must be a whole number of GPUs")
        check(self.num_cpus_per_actor > 0, f"{key}.num_cpus_per_actor", self.num_cpus_per_actor, "must be positive")
        check(self.decode_cpus > 0, f"{key}.decode_cpus", self.decode_cpus, "must be positive")
        check(0 <= self.max_failure_fraction <= 1, f"{key}.max_failure_fraction", self.max_failure_fraction,
              "must be in [0, 1]")
        check(self.progress_every_s > 0, f"{key}.progress_every_s", self.progress_every_s, "must be positive")

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers this job runs, in column order."""
        if self.image_folder is not None:
            return ("image",)
        return ("image", "text") if self.embed == "both" else (self.embed,)
