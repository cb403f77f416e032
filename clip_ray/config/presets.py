"""Named model configurations and the one-number scaling rule used by sweeps.

The published presets reproduce OpenAI's released CLIP models (Radford et al.
2021, tables 19 and 20) shape for shape, so their checkpoints load into them;
ViT-H/14, ViT-g/14 and ViT-bigG/14 reproduce OpenCLIP's configurations of those names.
The small presets are for CPU runs, tests and the bottom of scaling sweeps.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from clip_ray.config.model import ModelConfig, TextConfig, VisionConfig


def _openai(name: str, embed_dim: int, vision: VisionConfig, text_width: int) -> ModelConfig:
    """OpenAI's text tower is the same 12-layer, 77-token, 49408-word Transformer in every release."""
    return ModelConfig(name=name, embed_dim=embed_dim, vision=vision,
                       text=TextConfig(context_length=77, vocab_size=49408, width=text_width, layers=12),
                       activation="quick_gelu")


def _openclip(name: str, embed_dim: int, vision: VisionConfig, text_width: int, text_layers: int) -> ModelConfig:
    """OpenCLIP's large ViTs widen and deepen OpenAI's text tower (heads stay 64 wide) and train with plain GELU."""
    return ModelConfig(name=name, embed_dim=embed_dim, vision=vision,
                       text=TextConfig(context_length=77, vocab_size=49408, width=text_width, layers=text_layers),
                       activation="gelu")


def _vit(image_size: int, width: int, layers: int, patch_size: int, head_width: int = 64,
         mlp_ratio: float = 4.0) -> VisionConfig:
    return VisionConfig(arch="vit", image_size=image_size, width=width, layers=layers, patch_size=patch_size,
                        head_width=head_width, mlp_ratio=mlp_ratio)


def _resnet(image_size: int, width: int, resnet_layers: tuple[int, int, int, int]) -> VisionConfig:
    return VisionConfig(arch="resnet", image_size=image_size, width=width, resnet_layers=resnet_layers)


def _tiny_text(vocab_size: int, context_length: int, width: int, layers: int, head_width: int) -> TextConfig:
    return TextConfig(context_length=context_length, vocab_size=vocab_size, width=width, layers=layers,
                      head_width=head_width)


_PRESETS: dict[str, ModelConfig] = {
    config.name: config
    for config in [
        _openai("RN50", 1024, _resnet(224, 64, (3, 4, 6, 3)), 512),
        _openai("RN101", 512, _resnet(224, 64, (3, 4, 23, 3)), 512),
        _openai("RN50x4", 640, _resnet(288, 80, (4, 6, 10, 6)), 640),
        _openai("RN50x16", 768, _resnet(384, 96, (6, 8, 18, 8)), 768),
        _openai("RN50x64", 1024, _resnet(448, 128, (3, 15, 36, 10)), 1024),
        _openai("ViT-B/32", 512, _vit(224, 768, 12, 32), 512),
        _openai("ViT-B/16", 512, _vit(224, 768, 12, 16), 512),
        _openai("ViT-L/14", 768, _vit(224, 1024, 24, 14), 768),
        _openai("ViT-L/14@336", 768, _vit(336, 1024, 24, 14), 768),
        # OpenCLIP's odd MLP ratios are what its configs say: int(width * ratio) gives 6144 and 8192 hidden units.
        _openclip("ViT-H/14", 1024, _vit(224, 1280, 32, 14, head_width=80), 1024, 24),
        _openclip("ViT-g/14", 1024, _vit(224, 1408, 40, 14, head_width=88, mlp_ratio=4.3637), 1024, 24),
        _openclip("ViT-bigG/14", 1280, _vit(224, 1664, 48, 14, head_width=104, mlp_ratio=4.9231), 1280, 32),
        # A few million parameters: trains for real on a laptop CPU in minutes.
        ModelConfig(name="vit-tiny", embed_dim=128,
                    vision=VisionConfig(image_size=64, width=128, layers=4, patch_size=8, head_width=32),
                    text=_tiny_text(4096, 32, 128, 4, 32)),
        # Roughly 10M parameters: the largest model that is still pleasant on CPU.
        ModelConfig(name="vit-small-cpu", embed_dim=256,
                    vision=VisionConfig(image_size=64, width=256, layers=6, patch_size=8, head_width=64),
                    text=_tiny_text(8192, 40, 256, 6, 64)),
        ModelConfig(name="rn-tiny", embed_dim=128,
                    vision=VisionConfig(arch="resnet", image_size=64, width=16, resnet_layers=(1, 1, 1, 1),
                                        head_width=64),
                    text=_tiny_text(4096, 32, 128, 4, 32)),
    ]
}


def _key(name: str) -> str:
    """Case-insensitive, and OpenCLIP's spelling ('ViT-B-32', 'ViT-L-14-336') works too."""
    return name.lower().replace("/", "-").replace("@", "-")


_BY_KEY = {_key(name): name for name in _PRESETS}


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset, safe to modify."""
    canonical = _BY_KEY.get(_key(name))
    if canonical is None:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(_PRESETS)}")
    return copy.deepcopy(_PRESETS[canonical])


def _round_to_multiple(value: float, multiple: int) -> int:
    return max(multiple, multiple * round(value / multiple))


def scale_model(config: ModelConfig, factor: float) -> ModelConfig:
    """Grows (factor > 1) or shrinks a model along one axis, for compute sweeps.

    ViT: `factor` multiplies the width of both towers and the embedding dim;
    depth and resolution stay. Widths are rounded to a multiple of the tower's
    head width (so head size is constant and at least one head remains); the
    embedding dim to a multiple of the text head width.

    ResNet: `factor` is a compute multiplier spent equally on width, depth and
    resolution, as the CLIP paper does for RN50x4/x16/x64. Compute grows with
    width squared, depth and resolution squared, so blocks per stage scale by
    factor^(1/3), channel width and image size by factor^(1/6) (image size
    rounded to a multiple of 32, width to keep whole attention-pool heads). The
    text tower, for which the paper scales only width, and the embedding dim
    take the same factor^(1/6) width multiplier. RN50 scaled by 4 gives width
    80 and 288 px, as in RN50x4.
    """
    if factor <= 0:
        raise ValueError(f"scale factor must be positive, got {factor}")
    vision, text = config.vision, config.text
    if vision.arch == "vit":
        width_mult = factor
        vision = dataclasses.replace(vision, width=_round_to_multiple(vision.width * factor, vision.head_width))
    else:
        width_mult = factor ** (1 / 6)
        # 32 * width must split into attention-pool heads of head_width channels.
        width_step = vision.head_width // math.gcd(32, vision.head_width)
        vision = dataclasses.replace(
            vision,
            width=_round_to_multiple(vision.width * width_mult, width_step),
            image_size=_round_to_multiple(vision.image_size * width_mult, 32),
            resnet_layers=tuple(max(1, round(n * factor ** (1 / 3))) for n in vision.resnet_layers),
        )
    text = dataclasses.replace(text, width=_round_to_multiple(text.width * width_mult, text.head_width))
    scaled = dataclasses.replace(
        config, name=f"{config.name}-x{factor:g}", vision=vision, text=text,
        embed_dim=_round_to_multiple(config.embed_dim * width_mult, text.head_width))
    scaled.validate()
    return scaled
