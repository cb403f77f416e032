"""One training job: optimisation, evaluation, tracking, the cluster, and the whole Config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clip_ray.config.data import DataConfig, DemoDataConfig
from clip_ray.config.dataclass_io import ConfigError, apply_override, check, deep_merge, from_dict, load_yaml, to_dict
from clip_ray.config.model import ModelConfig
from clip_ray.config.presets import get_preset


@dataclass
class TrainConfig:
    """The optimisation run: what one step is and how many there are."""

    loss: Literal["clip", "siglip"] = "clip"
    # Pairs per optimiser step over all workers; every pair is a negative for every other.
    global_batch_size: int = 256
    # Micro-batches per step and worker. Negatives still span the whole global batch
    # (features are cached GradCache-style), so accumulation only saves memory.
    accumulation_steps: int = 1
    # With accumulation, the loss over the local rows x global columns is computed (forward and backward)
    # this many rows at a time: peak logits memory chunk x global batch instead of local x global.
    # None: all local rows at once.
    loss_chunk_rows: int | None = None
    steps: int = 1000
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    # How the model is spread over the workers. "ddp": every worker holds the whole model, its gradients
    # and optimiser state (16 bytes a parameter; fits up to about ViT-L/14 on an 80 GB GPU). "fsdp":
    # FSDP2 shards each residual block's parameters, gradients and optimiser state over the workers and
    # gathers a block only while it computes (ViT-H/14 and larger). With bf16, FSDP also gathers the
    # parameters in bf16 and reduces gradients in fp32. Checkpoints hold full state dicts either way, so
    # a run resumes under the other strategy or another number of workers.
    strategy: Literal["ddp", "fsdp"] = "ddp"
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
    # torch.compile's mode: "max-autotune" searches matmul kernels (minutes of compiling, faster steps);
    # "reduce-overhead" adds CUDA graphs, which one-GPU runs can use (DDP's bucketed all-reduce splits them).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
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
        check(self.strategy in ("ddp", "fsdp"), f"{key}.strategy", self.strategy, "must be 'ddp' or 'fsdp'")
        check(not (self.strategy == "fsdp" and self.precision == "fp16"), f"{key}.precision", self.precision,
              "fp16 needs a loss scaler that knows sharded gradients; use bf16 (or fp32) with strategy 'fsdp'")
        check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.betas is not None:
            check(all(0 <= b < 1 for b in self.betas), f"{key}.betas", self.betas, "must be in [0, 1)")
        if self.eps is not None:
            check(self.eps > 0, f"{key}.eps", self.eps, "must be positive")
        if self.loss_chunk_rows is not None:
            check(self.loss_chunk_rows > 0, f"{key}.loss_chunk_rows", self.loss_chunk_rows, "must be positive")
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
    # "sync": every worker evaluates its share while training waits. "async": the mid-run evaluations
    # (train.eval_every) run in a Ray actor on a copy of the weights while training goes on; the
    # evaluations before and after training stay sync.
    mode: Literal["sync", "async"] = "sync"
    # The async evaluator actor's resources (a GPU share makes it evaluate on that GPU).
    async_num_cpus: float = 1.0
    async_num_gpus: float = 0.0
    # At the end of training, how long to wait for async evaluations still running before going on without.
    async_wait_s: float = 1800.0

    def validate(self, key: str = "eval") -> None:
        check(self.batch_size > 0, f"{key}.batch_size", self.batch_size, "must be positive")
        check(all(k > 0 for k in self.recall_at), f"{key}.recall_at", self.recall_at, "must be positive")
        check(self.mode in ("sync", "async"), f"{key}.mode", self.mode, "must be 'sync' or 'async'")
        for name in ("async_num_cpus", "async_num_gpus"):
            check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "must be >= 0")
        check(self.async_wait_s > 0, f"{key}.async_wait_s", self.async_wait_s, "must be positive")


@dataclass
class TrackingConfig:
    """MLflow, from rank 0 only. Training never stops because the server is away."""

    # None: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db (artifacts in ./mlruns), resolved on the driver.
    tracking_uri: str | None = None
    experiment: str = "clip-ray"
    run_name: str | None = None
    # Set by sweeps: the run becomes a child of this run.
    parent_run_id: str | None = None
    # Tags set on the run when it is created. The driver adds MLflow's source tags (mlflow.source.name,
    # mlflow.source.type, mlflow.user, mlflow.source.git.commit): a Ray worker's user and directory may differ.
    tags: dict[str, str] = field(default_factory=dict)
    # Log the final model as an MLflow model (sweeps turn it off: their trials keep checkpoints).
    log_model: bool = True
    # Register the final model under this name in the model registry (a new version of it each run); the
    # version is the pyfunc model that `mlflow models serve models:/NAME/VERSION` serves.
    register_as: str | None = None
    log_system_metrics: bool = True
    # How long to wait before trying an unreachable server again.
    retry_interval_s: float = 30.0
    # At the end of a run: how long to wait for an unreachable server before giving up on what is
    # not yet sent (it stays in the checkpoints; the run still finishes).
    close_timeout_s: float = 60.0


@dataclass
class ClusterConfig:
    """Ray Train: how many workers, what each gets, where checkpoints live."""

    num_workers: int = 1
    use_gpu: bool = False
    # Fractions work and are what a 2-core laptop needs (Ray Data tasks need CPUs too).
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    # Custom Ray resources each training worker also asks for: node roles. {trainer: 1} keeps the workers
    # on nodes that advertise "trainer" (infra/local/add-worker.sh --role trainer, the KubeRay GPU group, the
    # cloud GPU node type), so CPU-only data nodes run preprocessing only.
    worker_resources: dict[str, float] = field(default_factory=dict)
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
        for name, amount in self.worker_resources.items():
            check(name not in ("CPU", "GPU", "memory"), f"{key}.worker_resources.{name}", amount,
                  "is set by cpus_per_worker / gpus_per_worker; name a custom resource here")
            check(amount > 0, f"{key}.worker_resources.{name}", amount, "must be positive")
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
            check(bool(self.data.tokenizer) or bool(self.model.init_from), "data.tokenizer", self.data.tokenizer,
                  "is required (it may be left out with a model.init_from that records its tokenizer)")
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
        try:
            base = to_dict(get_preset(model["preset"]))
        except (KeyError, ValueError) as err:
            raise ConfigError(f"model.preset={model['preset']!r}: {err.args[0]}") from None
        overrides_of_preset = {k: v for k, v in model.items() if k != "preset"}
        data["model"] = deep_merge(base, overrides_of_preset)
    config = from_dict(Config, data)
    config.validate()
    return config
