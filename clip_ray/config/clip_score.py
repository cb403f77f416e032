"""The CLIP-score filter of `clip-ray data curate`: which model scores the pairs, which pairs stay, how the actors run.

DataComp's strongest simple baseline: keep the pairs whose image-text cosine under a CLIP
model is high. `min_score` keeps pairs whose cosine is at least it; `top_fraction` keeps the
best f of the pairs that reach the filter (ceil(f x scored), ties to the earlier pair); with
both a pair must pass both. The model is any source clip_ray.inference.models resolves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clip_ray.config.dataclass_io import check

CLIP_SCORE_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


@dataclass
class ClipScoreConfig:
    """One CLIP-score filter. `validate(names=...)` lets a caller (the CLI) name its own flags in errors."""

    # A checkpoint or run directory, model.pt / state dict file, or MLflow URI (runs:/ID[/model], models:/...).
    model: str = ""
    # The model's tokenizer file; default: the one its checkpoint's run or MLflow run recorded.
    tokenizer: str | None = None
    # MLflow server of an MLflow model source (default: $MLFLOW_TRACKING_URI).
    tracking_uri: str | None = None
    # A plain state dict does not record its activation: OpenAI's weights use quick_gelu, OpenCLIP's gelu.
    state_dict_activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    # Keep pairs whose cosine is >= this (in [-1, 1]).
    min_score: float | None = None
    # Keep the best this fraction (in (0, 1]) of the pairs scored: ceil(fraction x scored) pairs.
    top_fraction: float | None = None
    # Encoder actors (each loads the model once) and the resources of one.
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    # CPUs of one read + decode task (Ray Data tasks, any node).
    decode_cpus: float = 1.0
    # Pairs per encoder call (and per decoded block).
    batch_size: int = 256
    # Autocast of the encoder: auto is fp16 on a GPU, fp32 on a CPU. Scores are cosines of float32 unit vectors.
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    def validate(self, key: str = "clip_score", names: dict[str, str] | None = None, require_rule: bool = True) -> None:
        """Raises ConfigError naming the field as `key.field`, or as `names[field]` where given (e.g. a flag).
        `require_rule=False`: only the model and the actors are wanted (curation's near-duplicate filter)."""
        names = names or {}

        def name(field: str) -> str:
            return names.get(field, f"{key}.{field}")

        check(bool(self.model), name("model"), self.model, "is required")
        check(not require_rule or self.min_score is not None or self.top_fraction is not None, name("min_score"),
              self.min_score, f"give a threshold or {name('top_fraction')} (or both)")
        check(self.min_score is None or -1 <= self.min_score <= 1, name("min_score"), self.min_score,
              "is a cosine: must be in [-1, 1]")
        check(self.top_fraction is None or 0 < self.top_fraction <= 1, name("top_fraction"), self.top_fraction,
              "must be in (0, 1]")
        for field in ("actors", "batch_size", "cpus_per_actor", "decode_cpus"):
            check(getattr(self, field) > 0, name(field), getattr(self, field), "must be positive")
        check(self.gpus_per_actor >= 0, name("gpus_per_actor"), self.gpus_per_actor, "must be >= 0")
        check(self.gpus_per_actor <= 1 or float(self.gpus_per_actor).is_integer(), name("gpus_per_actor"),
              self.gpus_per_actor, "above 1 must be a whole number of GPUs")
        check(self.precision in CLIP_SCORE_PRECISIONS, name("precision"), self.precision,
              f"must be one of {CLIP_SCORE_PRECISIONS}")
