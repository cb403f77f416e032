"""Reading back what `clip-ray export --to safetensors` writes: weights without pickle, and the architecture.

    model.safetensors    the state dict in OpenAI's layout (any float dtype; read as float32)
    model_config.json    ModelConfig.architecture(): what the weights alone do not say (activation, heads, pad id)
    tokenizer            tokenizer.json or bpe_simple_vocab_16e6.txt.gz, as clip-ray saves it

Here rather than beside the writer (clip_ray/driver/export_formats.py) so that resolving a model source
(inference/models.py) can read such a folder too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clip_ray.config import ModelConfig, from_dict

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_CONFIG = "model_config.json"


def safetensors_export_files(path: str | Path) -> tuple[Path, Path]:
    """(weights, config) of an exported folder, or of its model.safetensors given directly."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / SAFETENSORS_WEIGHTS if path.is_dir() else path
    config = folder / SAFETENSORS_CONFIG
    for needed in (weights, config):
        if not needed.is_file():
            raise FileNotFoundError(f"{path}: no {needed.name} in {folder}: not what `clip-ray export --to "
                                    "safetensors` writes")
    return weights, config


def read_safetensors_export(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(architecture, float32 weights) of an exported folder or its weights file."""
    from safetensors.torch import load_file

    weights, config = safetensors_export_files(path)
    model_config = from_dict(ModelConfig, json.loads(config.read_text()))
    state = {name: t.float() if t.is_floating_point() else t for name, t in load_file(weights).items()}
    return model_config, state


def load_safetensors_export(path: str | Path) -> torch.nn.Module:
    """A clip-ray CLIP in eval mode, float32, from an exported folder or its weights file."""
    from clip_ray.model import build_model

    model_config, state = read_safetensors_export(path)
    model = build_model(model_config, device="meta")
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()
