"""The CLIP model: an image tower and a text tower meeting in one embedding space.

The state dict uses OpenAI's key names and shapes (`visual.*` for the image
tower, the text tower at the top level, `logit_scale`), so OpenAI's released
weights and OpenCLIP's exports of them load with strict=True, and our
checkpoints load there too.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.config.presets import get_preset
from clip_ray.model.resnet import ModifiedResNet
from clip_ray.model.text import TextTransformer
from clip_ray.model.vit import VisionTransformer


class ClipOutput(NamedTuple):
    image_features: torch.Tensor      # [B, embed_dim], unit norm
    text_features: torch.Tensor       # [B, embed_dim], unit norm
    logit_scale: torch.Tensor         # exp() of the learned log-temperature
    logit_bias: torch.Tensor | None   # SigLIP's learned bias, when the model has one


class CLIP(TextTransformer):
    """Inherits the text tower (see text.py) so its parameters carry OpenAI's top-level names."""

    def __init__(self, config: ModelConfig):
        config.validate()
        super().__init__(config.text, config.embed_dim, config.activation)
        self.config = config
        if config.vision.arch == "vit":
            self.visual = VisionTransformer(config.vision, config.embed_dim, config.activation)
        else:
            self.visual = ModifiedResNet(config.vision, config.embed_dim)  # ReLU throughout, as OpenAI's
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
        if config.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(config.init_logit_bias))
        else:
            self.logit_bias = None
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.transformer.grad_checkpointing = enable

    def patch_keep_indices(self, batch: int, device: torch.device | str) -> torch.Tensor | None:
        """The patches a training pass of `batch` images keeps, drawn now (None: no patch dropout)."""
        return self.visual.patch_keep_indices(batch, device) if isinstance(self.visual, VisionTransformer) else None

    def encode_image(self, images: torch.Tensor, normalize: bool = True,
                     patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        features = self.visual(images) if patch_keep is None else self.visual(images, patch_keep)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features = self.text_features(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, patch_keep: torch.Tensor | None = None) -> ClipOutput:
        return ClipOutput(self.encode_image(images, patch_keep=patch_keep), self.encode_text(tokens),
                          self.logit_scale.exp(), self.logit_bias)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keeps the learned temperature in [0, max_logit_scale]; call after every optimiser step."""
    clip = unwrap_model(model)
    clip.logit_scale.clamp_(0, clip.config.max_logit_scale)


def build_model(name_or_config: str | ModelConfig, device: torch.device | str | None = None) -> CLIP:
    """A freshly initialised CLIP from a preset name or a config.

    device="meta" builds the structure without allocating memory (parameter
    counts, FLOPs, shape checks of the largest models).
    """
    config = get_preset(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return CLIP(config)


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered sub-modules `prefix.N.` the state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return len({m.group(1) for key in state_dict if (m := pattern.match(key))})


def _head_width(width: int, preferred: int) -> int:
    """OpenAI's convention is 64-wide heads; a width it does not divide gets the largest width that does."""
    return math.gcd(width, preferred)


def model_config_from_state_dict(state_dict: dict[str, torch.Tensor], head_width: int = 64) -> ModelConfig:
    """Reads a model's shape back from an OpenAI-layout state dict.

    The head count is not stored in the weights, so heads are assumed
    `head_width` wide (OpenAI's convention). Activation, patch dropout, pad id and
    the temperature settings are not in the weights either: they keep the
    defaults, and the caller sets them.
    """
    sd = state_dict
    if "visual.proj" in sd:
        width, _, patch_size, _ = sd["visual.conv1.weight"].shape
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        vision = VisionConfig(
            arch="vit", image_size=grid * patch_size, width=width, patch_size=patch_size,
            layers=_count_blocks(sd, "visual.transformer.resblocks"),
            head_width=_head_width(width, head_width),
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)
    elif "visual.attnpool.c_proj.weight" in sd:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        # The attention pool's positional embedding covers the final feature map (stride 32) plus the mean token.
        grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
        vision = VisionConfig(
            arch="resnet", image_size=grid * 32, width=width,
            resnet_layers=tuple(_count_blocks(sd, f"visual.layer{stage}") for stage in range(1, 5)),
            head_width=_head_width(32 * width, head_width))
    else:
        raise ValueError("state dict has neither a ViT ('visual.proj') nor a ResNet ('visual.attnpool') image tower")
    vocab_size, text_width = sd["token_embedding.weight"].shape
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0], vocab_size=vocab_size, width=text_width,
        layers=_count_blocks(sd, "transformer.resblocks"), head_width=_head_width(text_width, head_width),
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width)
    logit_bias = sd.get("logit_bias")
    return ModelConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text,
                       init_logit_bias=None if logit_bias is None else float(logit_bias))


# OpenAI's TorchScript archives also carry these scalars as state-dict entries.
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def build_model_from_state_dict(state_dict: dict[str, torch.Tensor], activation: str = "quick_gelu",
                                head_width: int = 64, pad_token_id: int = 0) -> CLIP:
    """Builds a CLIP shaped like `state_dict` and loads it with strict=True.

    The defaults suit OpenAI's released weights: QuickGELU, 64-wide heads, pad id 0.
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in _OPENAI_METADATA_KEYS}
    config = model_config_from_state_dict(state_dict, head_width=head_width)
    config.activation = activation
    config.text.pad_token_id = pad_token_id
    # Built without memory, then the checkpoint's own tensors are adopted; training wants fp32 master weights.
    model = build_model(config, device="meta")
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.float()
