"""A scaling sweep: one training job config, varied in model width, data and learning rate.

A sweep file names its base job and the axes:

    base: demo-cpu.yaml              # a job config, relative to this file
    base_overrides: ["train.log_every=50"]
    sweep:
      name: demo-widths
      width_multipliers: [0.5, 1, 2]
      samples_seen: [6400, 12800, 25600]

Every trial is the base job with its model scaled (clip_ray.model.scale_model),
train.steps = samples_seen / global_batch_size, and, when `lrs` is given, its
learning rate. See clip_ray.driver.sweep for how trials run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from clip_ray.config.dataclass_io import ConfigError, apply_override, check, from_dict, load_yaml
from clip_ray.config.job import Config, load_config


@dataclass
class SweepConfig:
    """The Ray Tune experiment over training jobs, and what the analysis at its end fits."""

    # The Tune experiment's name under storage_path: running the same name again resumes it.
    name: str = "clip-ray-sweep"
    # Local path or pyarrow URI; trials keep their Ray Train runs beneath it, in <name>/runs/.
    storage_path: str = "./sweeps"
    width_multipliers: list[float] = field(default_factory=lambda: [1.0])
    # Training pairs each trial sees (the data-scale axis); empty: the base job's steps.
    samples_seen: list[int] = field(default_factory=list)
    # Learning rates to try; empty: the base job's train.lr.
    lrs: list[float] = field(default_factory=list)
    # grid: every combination (x repeats). random: `num_samples` draws from the lists.
    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1
    # asha: stop trials whose validation metric trails at a rung (needs Ray's dashboard running).
    scheduler: Literal["fifo", "asha"] = "fifo"
    # ASHA rungs are in samples seen: the first at grace_samples, then x reduction_factor.
    asha_grace_samples: int = 10_000
    asha_reduction_factor: float = 2.0
    # The metric ASHA ranks trials by and the analysis fits: a loss (min) or an accuracy (max).
    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    # Evaluations per trial (learning curves, ASHA rungs); the final one always happens.
    evals_per_trial: int = 4
    max_concurrent_trials: int = 1
    # CPUs of each trial's Tune driver: it only builds and watches the trial's TorchTrainer,
    # whose workers ask for cluster.* resources of their own. Ray refuses 0.
    trial_driver_cpus: float = 0.1
    # Log each trial's final model to MLflow too (its checkpoints are kept either way).
    log_trial_models: bool = False
    # Ray Tune retries a failed trial this often; its Ray Train run resumes from its checkpoint.
    max_trial_failures: int = 0
    # A compute budget (FLOPs) for which the analysis reports the compute-optimal model and data.
    budget: float | None = None
    # Seeds the random search's draws and the analysis's bootstrap.
    seed: int = 0

    def validate(self, key: str = "sweep") -> None:
        check(bool(self.name) and "/" not in self.name, f"{key}.name", self.name, "must be a plain name")
        check(bool(self.width_multipliers) and all(w > 0 for w in self.width_multipliers),
              f"{key}.width_multipliers", self.width_multipliers, "must be positive, at least one")
        for name in ("samples_seen", "lrs"):
            check(all(v > 0 for v in getattr(self, name)), f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.num_samples > 0, f"{key}.num_samples", self.num_samples, "must be positive")
        check(self.asha_grace_samples > 0, f"{key}.asha_grace_samples", self.asha_grace_samples, "must be positive")
        check(self.asha_reduction_factor > 1, f"{key}.asha_reduction_factor", self.asha_reduction_factor,
              "must be above 1")
        check(self.evals_per_trial > 0, f"{key}.evals_per_trial", self.evals_per_trial, "must be positive")
        check(self.max_concurrent_trials > 0, f"{key}.max_concurrent_trials", self.max_concurrent_trials,
              "must be positive")
        check(self.trial_driver_cpus > 0, f"{key}.trial_driver_cpus", self.trial_driver_cpus,
              "must be positive (Ray refuses a trial without resources)")
        if self.budget is not None:
            check(self.budget > 0, f"{key}.budget", self.budget, "must be positive")


@dataclass
class SweepFile:
    """A sweep file: the base job (already loaded and overridden) plus the sweep section."""

    base: Config
    sweep: SweepConfig
    base_path: Path | None = None


def load_sweep_config(path: str | Path, overrides: list[str] = ()) -> SweepFile:
    """A sweep YAML (+ `sweep.x=...` or base `train.x=...` overrides) -> validated base job and sweep.

    Overrides starting with `sweep.` go to the sweep section; all others to the base job.
    """
    path = Path(path)
    raw = load_yaml(path)
    unknown = sorted(set(raw) - {"base", "base_overrides", "sweep"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)} (expected base, base_overrides, "
                          "sweep)")
    if not raw.get("base"):
        raise ConfigError(f"{path}: base: is required (the job config every trial starts from)")
    base_path = (path.parent / raw["base"]).resolve()
    if not base_path.is_file():
        raise ConfigError(f"base={raw['base']!r}: no such job config ({base_path})")
    sweep_overrides = [o.removeprefix("sweep.") for o in overrides if o.startswith("sweep.")]
    job_overrides = list(raw.get("base_overrides") or []) + [o for o in overrides if not o.startswith("sweep.")]
    base = load_config(base_path, job_overrides)
    section = dict(raw.get("sweep") or {})
    for assignment in sweep_overrides:
        apply_override(section, assignment)
    sweep = from_dict(SweepConfig, section, "sweep") if section else SweepConfig()
    sweep.validate()
    if base.data.val == [] and base.demo is None:
        raise ConfigError(f"base={raw['base']!r}: data.val is empty; a sweep compares trials by their "
                          f"validation metric {sweep.metric!r}")
    return SweepFile(base=base, sweep=sweep, base_path=base_path)
