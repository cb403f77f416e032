"""CLIP models: Vision Transformer and modified-ResNet image towers, a causal text Transformer,
OpenAI-compatible state dicts, named presets, scaling for sweeps, and parameter/FLOP counts."""

from clip_ray.config.presets import get_preset, list_presets, scale_model
from clip_ray.model.clip import (
    CLIP, ClipOutput, build_model, build_model_from_state_dict, clamp_logit_scale, model_config_from_state_dict,
    unwrap_model,
)
from clip_ray.model.stats import model_stats

__all__ = [
    "CLIP",
    "ClipOutput",
    "build_model",
    "build_model_from_state_dict",
    "clamp_logit_scale",
    "get_preset",
    "list_presets",
    "model_config_from_state_dict",
    "model_stats",
    "scale_model",
    "unwrap_model",
]
