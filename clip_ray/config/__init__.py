"""Typed configuration for clip-ray, in one place.

One config object flows from YAML and `--set` overrides to every worker. The
loader is strict on purpose: an unknown key, a wrong type or an impossible
value is a one-line `ConfigError` naming the key, raised before any worker
starts.

    model.py   VisionConfig, TextConfig, ModelConfig
    data.py    SourceConfig, DataConfig, DemoDataConfig
    job.py     TrainConfig, EvalConfig, TrackingConfig, ClusterConfig, Config, load_config
    sweep.py   SweepConfig, load_sweep_config (a Ray Tune sweep over training jobs)
"""

from clip_ray.config.data import DataConfig, DemoDataConfig, SourceConfig
from clip_ray.config.job import (
    ClusterConfig, Config, EvalConfig, TrackingConfig, TrainConfig, load_config,
)
from clip_ray.config.model import ModelConfig, TextConfig, VisionConfig
from clip_ray.config.sweep import SweepConfig, SweepFile, load_sweep_config
from clip_ray.dataclass_io import (
    ConfigError, apply_override, check, deep_merge, from_dict, load_yaml, to_dict,
)

__all__ = [
    "ClusterConfig", "Config", "ConfigError", "DataConfig", "DemoDataConfig", "EvalConfig", "ModelConfig",
    "SourceConfig", "SweepConfig", "SweepFile", "TextConfig", "TrackingConfig", "TrainConfig", "VisionConfig", "apply_override", "check",
    "deep_merge", "from_dict", "load_config", "load_sweep_config", "load_yaml", "to_dict",
]
