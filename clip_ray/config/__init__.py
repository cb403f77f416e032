"""Typed configuration for clip-ray, in one place.

One config object flows from YAML and `--set` overrides to every worker. The
loader is strict on purpose: an unknown key, a wrong type or an impossible
value is a one-line `ConfigError` naming the key, raised before any worker
starts. `load_config` is where values are checked, once per job; the driver then
prepares the checked config for its workers (clip_ray.driver.prepare).

    model.py         VisionConfig, TextConfig, ModelConfig
    data.py          SourceConfig, DataConfig, DemoDataConfig
    job.py           TrainConfig, EvalConfig, TrackingConfig, ClusterConfig, Config, load_config
    sweep.py         SweepConfig, load_sweep_config (a Ray Tune sweep over training jobs)
    embed.py         EmbedConfig (a `clip-ray embed` job: input, model, actors, output)
    suite.py         SuiteConfig, load_suite (`clip-ray eval --suite`: zero-shot, linear-probe and retrieval tasks)
    clip_score.py    ClipScoreConfig (curation's CLIP-score filter: model, threshold / top fraction, actors)
    presets.py       the named models (OpenAI's releases, small CPU ones) and scale_model for sweeps
    dataclass_io.py  strict dict <-> dataclass conversion, YAML, `--set` overrides, ConfigError
"""

from clip_ray.config.data import DataConfig, DemoDataConfig, SourceConfig
from clip_ray.config.dataclass_io import ConfigError, apply_override, check, deep_merge, from_dict, load_yaml, to_dict
from clip_ray.config.embed import EmbedConfig
from clip_ray.config.job import ClusterConfig, Config, EvalConfig, TrackingConfig, TrainConfig, load_config
from clip_ray.config.model import ModelConfig, TextConfig, VisionConfig
from clip_ray.config.sweep import SweepConfig, SweepFile, load_sweep_config

__all__ = [
    "ClusterConfig", "Config", "ConfigError", "DataConfig", "DemoDataConfig", "EmbedConfig", "EvalConfig",
    "ModelConfig", "SourceConfig", "SweepConfig", "SweepFile", "TextConfig", "TrackingConfig", "TrainConfig",
    "VisionConfig", "apply_override", "check", "deep_merge", "from_dict", "load_config", "load_sweep_config",
    "load_yaml", "to_dict",
]
