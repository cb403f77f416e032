"""Tiny training jobs for the trainer and job tests: real demo shards, a model of a few
thousand parameters, fp32 on CPU (deterministic), steps of a fraction of a second."""

from __future__ import annotations

import socket
from pathlib import Path

import yaml

from clip_ray.config import DemoDataConfig

# Few hundred 32-px scenes: drawn in a second or two.
TINY_DEMO = {"image_size": 32, "num_train": 480, "num_val": 64, "num_zeroshot_per_class": 4,
             "samples_per_shard": 80}


def tiny_demo_config() -> DemoDataConfig:
    return DemoDataConfig(**TINY_DEMO)


def tiny_config(storage: Path, run_name: str, steps: int, tracking_uri: str, **sections) -> dict:
    """A job config as YAML would give it; `sections` are merged into the top-level sections."""
    config = {
        "model": {"name": "tiny", "embed_dim": 32,
                  "vision": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                  "text": {"context_length": 24, "vocab_size": 384, "width": 32, "layers": 1, "head_width": 16}},
        "data": {"tokenizer": "bpe:384", "shuffle_buffer": 64, "preprocess_batch_size": 64},
        "train": {"global_batch_size": 32, "steps": steps, "warmup_steps": 2, "lr": 1e-3, "precision": "fp32",
                  "log_every": 1, "eval_every": 0, "checkpoint_every": 1, "keep_checkpoints": 50},
        "eval": {"batch_size": 32, "zeroshot_templates": "demo"},
        "tracking": {"tracking_uri": tracking_uri, "experiment": "tests", "log_system_metrics": False,
                     "retry_interval_s": 1.0, "close_timeout_s": 5.0},
        "cluster": {"num_workers": 1, "cpus_per_worker": 1, "storage_path": str(storage), "run_name": run_name},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
