"""Fitting someone else's weights to the model a run is configured to train (`model.init_from`).

The run's `model:` section stays authoritative: the weights must have its shapes, tensor for tensor,
except the positional embeddings, which are resized for another image size or context length by
interpolation (bicubic over the patch grid, linear over text positions, as OpenCLIP resizes them).
What the weights cannot show (activation, head width) is compared with the source's own config where
it has one. `init_from_towers` takes one tower only: LiT keeps a pretrained image tower and trains a
fresh text tower against it.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F

from clip_ray.config import ConfigError, ModelConfig
from clip_ray.model.clip import build_model
from clip_ray.storage import resolve

# The text tower is CLIP's top level (clip.py), so "not visual" is text, except the shared temperature.
_SHARED_KEYS = ("logit_scale", "logit_bias")
# A grid of patch (ViT) or feature-map (ResNet attention pool) positions behind one class/mean position.
_GRID_EMBEDDINGS = ("visual.positional_embedding", "visual.attnpool.positional_embedding")
_TEXT_POSITIONS = "positional_embedding"


def tower_of(key: str) -> str:
    """"image", "text" or "shared" for a state-dict key of CLIP's OpenAI layout."""
    if key.startswith("visual."):
        return "image"
    if key in _SHARED_KEYS:
        return "shared"
    return "text"


def keys_taken(towers: str) -> callable:
    """Which keys `init_from_towers` takes from the weights: both towers also take the temperature."""
    return lambda key: towers == "both" or tower_of(key) == towers


def resize_grid_embedding(embedding: torch.Tensor, new_positions: int, key: str) -> torch.Tensor:
    """[1 + g*g, W] -> [1 + h*h, W]: the leading class (or mean) position kept, the square grid resampled."""
    old_grid, new_grid = math.isqrt(embedding.shape[0] - 1), math.isqrt(new_positions - 1)
    if old_grid ** 2 + 1 != embedding.shape[0] or new_grid ** 2 + 1 != new_positions:
        raise ConfigError(f"model.init_from: {key} has {embedding.shape[0]} positions, not 1 + a square grid")
    lead, grid = embedding[:1], embedding[1:]
    width = grid.shape[1]
    grid = grid.float().reshape(1, old_grid, old_grid, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, width).to(embedding.dtype)
    return torch.cat([lead, grid])


def resize_text_positions(embedding: torch.Tensor, context_length: int) -> torch.Tensor:
    """[T, W] -> [context_length, W], linearly interpolated over the positions."""
    positions = embedding.float().t().unsqueeze(0)  # [1, W, T]
    positions = F.interpolate(positions, size=context_length, mode="linear", align_corners=False)
    return positions.squeeze(0).t().to(embedding.dtype)


def _check_same_computation(source: ModelConfig, target: ModelConfig, towers: str) -> None:
    """What a state dict cannot show: same shapes but another activation or head split computes differently."""
    fields = ["activation"]
    if towers in ("both", "image"):
        fields += ["vision.arch", "vision.head_width", "vision.patch_size"]
    if towers in ("both", "text"):
        fields += ["text.head_width", "text.pad_token_id"]
    for name in fields:
        theirs, ours = source, target
        for part in name.split("."):
            theirs, ours = getattr(theirs, part), getattr(ours, part)
        if theirs != ours:
            raise ConfigError(f"model.{name}={ours!r}: the weights of model.init_from were trained with {theirs!r}; "
                              f"set model.{name}: {theirs!r} (the shapes alone would have let this through)")


def fit_initial_weights(weights: Mapping[str, torch.Tensor], target: ModelConfig, towers: str = "both",
                        source_config: ModelConfig | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors to load into a fresh `target` model, notes on what was resized).

    Raises ConfigError naming the tensor when one is missing, unexpected or of another shape.
    """
    if source_config is not None:
        _check_same_computation(source_config, target, towers)
    expected = build_model(target, device="meta").state_dict()
    taken = keys_taken(towers)
    wanted = {key: value for key, value in expected.items() if taken(key)}
    # OpenAI's TorchScript archives carry scalars as entries.
    weights = {key: value for key, value in weights.items()
               if key not in ("input_resolution", "context_length", "vocab_size")}
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ConfigError(f"model.init_from: the weights lack {len(missing)} tensor(s) this model has: "
                          f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    unexpected = sorted(key for key in weights if taken(key) and key not in expected)
    if unexpected:
        raise ConfigError(f"model.init_from: the weights have tensor(s) this model does not: "
                          f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''} "
                          "(another architecture: check the model section)")
    fitted, notes = {}, []
    for key, shape in ((key, value.shape) for key, value in wanted.items()):
        value = weights[key]
        if value.shape != shape and value.ndim == 2 and len(shape) == 2 and value.shape[1] == shape[1]:
            if key in _GRID_EMBEDDINGS:
                value = resize_grid_embedding(value, shape[0], key)
            elif key == _TEXT_POSITIONS:
                value = resize_text_positions(value, shape[0])
            if value.shape == shape:
                notes.append(f"{key} resized from {tuple(weights[key].shape)} to {tuple(shape)}")
        if value.shape != shape:
            raise ConfigError(f"model.init_from: tensor {key} has shape {tuple(value.shape)}, this model's is "
                              f"{tuple(shape)} (check the model section against the weights)")
        value = value.detach().to(torch.float32) if value.is_floating_point() else value.detach()
        fitted[key] = value.contiguous()  # safetensors stores whole tensors, not views
    return fitted, notes


@torch.no_grad()
def load_initial_weights(model: torch.nn.Module, fitted: Mapping[str, torch.Tensor], towers: str = "both") -> None:
    """Copies `fitted` into `model`; exactly the keys `towers` takes must be there, the rest keep their init."""
    taken = keys_taken(towers)
    own = model.state_dict()
    expected = {key for key in own if taken(key)}
    if set(fitted) != expected:
        wrong = sorted(set(fitted) ^ expected)
        raise ValueError(f"initial weights do not cover the {towers} tower(s) exactly: {', '.join(wrong[:8])}")
    for key, value in fitted.items():
        own[key].copy_(value)


def read_prepared_weights(path: str) -> dict[str, torch.Tensor]:
    """A .safetensors file of OpenAI-layout weights, local or at a URI (what the driver prepares)."""
    from safetensors.torch import load

    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as stream:
        return load(stream.read())
