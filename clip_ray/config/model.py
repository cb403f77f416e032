"""The model section: both towers and the joint embedding."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from clip_ray.config.dataclass_io import check, to_dict


@dataclass
class VisionConfig:
    """Image tower. `arch` picks a Vision Transformer or CLIP's modified ResNet."""

    arch: Literal["vit", "resnet"] = "vit"
    image_size: int = 224
    # ViT: transformer width. ResNet: channels of the stem / first stage (64 for RN50).
    width: int = 768
    # ViT: number of residual blocks.
    layers: int = 12
    patch_size: int = 32
    # ResNet: bottleneck blocks per stage.
    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    # Attention heads are width // head_width (ResNet attention pool: 32 * width // head_width).
    head_width: int = 64
    # MLP hidden width is int(width * mlp_ratio), truncated as OpenCLIP does (ViT only).
    mlp_ratio: float = 4.0
    # FLIP-style: fraction of patch tokens dropped at random while training (ViT only).
    patch_dropout: float = 0.0

    def validate(self, key: str = "model.vision") -> None:
        check(self.image_size > 0, f"{key}.image_size", self.image_size, "must be positive")
        check(self.width > 0, f"{key}.width", self.width, "must be positive")
        check(self.head_width > 0, f"{key}.head_width", self.head_width, "must be positive")
        check(0.0 <= self.patch_dropout < 1.0, f"{key}.patch_dropout", self.patch_dropout, "must be in [0, 1)")
        if self.arch == "vit":
            check(self.layers > 0, f"{key}.layers", self.layers, "must be positive")
            check(1 <= self.width * self.mlp_ratio < math.inf, f"{key}.mlp_ratio", self.mlp_ratio,
                   "must give the MLP at least one hidden unit")
            check(self.width % self.head_width == 0, f"{key}.width", self.width,
                   f"must be a multiple of head_width={self.head_width}")
            check(self.image_size % self.patch_size == 0, f"{key}.image_size", self.image_size,
                   f"must be a multiple of patch_size={self.patch_size}")
        else:
            check(all(n > 0 for n in self.resnet_layers), f"{key}.resnet_layers", self.resnet_layers,
                   "every stage needs at least one block")
            check(self.image_size % 32 == 0, f"{key}.image_size", self.image_size,
                   "must be a multiple of 32 for a ResNet")
            check((self.width * 32) % self.head_width == 0, f"{key}.width", self.width,
                   f"32 * width must be a multiple of head_width={self.head_width}")


@dataclass
class TextConfig:
    """Causal text Transformer over BPE tokens."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    head_width: int = 64
    # MLP hidden width is int(width * mlp_ratio), truncated as OpenCLIP does.
    mlp_ratio: float = 4.0
    # Features are read at the last position whose token is not the pad id.
    pad_token_id: int = 0

    def validate(self, key: str = "model.text") -> None:
        for name in ("context_length", "vocab_size", "width", "layers", "head_width"):
            check(getattr(self, name) > 0, f"{key}.{name}", getattr(self, name), "must be positive")
        check(self.width % self.head_width == 0, f"{key}.width", self.width,
               f"must be a multiple of head_width={self.head_width}")
        check(1 <= self.width * self.mlp_ratio < math.inf, f"{key}.mlp_ratio", self.mlp_ratio,
               "must give the MLP at least one hidden unit")


# ModelConfig fields about a training run rather than the network (see ModelConfig.architecture).
TRAINING_ONLY_FIELDS = ("init_from", "init_from_towers", "lock_image", "lock_image_unlocked_blocks", "lock_image_freeze_bn_stats",
                        "lock_text", "lock_text_unlocked_blocks")


@dataclass
class ModelConfig:
    """A whole CLIP model: both towers plus the joint embedding and temperature."""

    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's released weights use QuickGELU; OpenCLIP's own trainings mostly GELU.
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    # The paper clips the learned temperature so logits are scaled by at most 100.
    max_logit_scale: float = math.log(100)
    # SigLIP's learnable logit bias (e.g. -10); None means the model has no bias parameter.
    init_logit_bias: float | None = None
    # Recompute each residual block in the backward pass (less memory, ~30% more compute).
    grad_checkpointing: bool = False
    # Start training from these weights instead of a random init (ignored when the run resumes from its own
    # checkpoint): an OpenAI/OpenCLIP state dict (.pt, TorchScript archive, .safetensors), a Hugging Face
    # CLIPModel folder, a clip-ray checkpoint, run directory or model.pt, or an MLflow model; local or a URI.
    # The architecture above stays authoritative: shapes must match, positional embeddings are resized.
    init_from: str | None = None
    # Which towers take init_from's weights; the others (and the temperature, unless both) start fresh.
    # LiT: "image", with lock_image.
    init_from_towers: Literal["both", "image", "text"] = "both"
    # Freeze a tower (LiT locks the image tower): its parameters leave the optimiser and the gradient
    # all-reduce. *_unlocked_blocks keeps the last N residual blocks (ResNet: stages) trainable, with
    # what follows them (final norm, projection).
    lock_image: bool = False
    lock_image_unlocked_blocks: int = 0
    # A locked ResNet's BatchNorm layers also stop updating their running statistics.
    lock_image_freeze_bn_stats: bool = True
    lock_text: bool = False
    lock_text_unlocked_blocks: int = 0

    def architecture(self) -> dict:
        """The fields that decide what the network computes: without where training starts or what it
        freezes, so a fine-tuned model and its starting point share an architecture digest."""
        return {k: v for k, v in to_dict(self).items() if k not in TRAINING_ONLY_FIELDS}

    def validate(self, key: str = "model") -> None:
        for name in ("lock_image_unlocked_blocks", "lock_text_unlocked_blocks"):
            check(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "must be >= 0")
        # A ResNet's blocks, for locking, are its four stages (clip_ray/model/locking.py).
        image_blocks = self.vision.layers if self.vision.arch == "vit" else len(self.vision.resnet_layers)
        check(self.lock_image_unlocked_blocks <= image_blocks, f"{key}.lock_image_unlocked_blocks",
              self.lock_image_unlocked_blocks, f"exceeds the image tower's {image_blocks} blocks")
        check(self.lock_text_unlocked_blocks <= self.text.layers, f"{key}.lock_text_unlocked_blocks",
              self.lock_text_unlocked_blocks, f"exceeds the text tower's {self.text.layers} blocks")
        check(self.embed_dim > 0, f"{key}.embed_dim", self.embed_dim, "must be positive")
        check(self.init_logit_scale <= self.max_logit_scale, f"{key}.init_logit_scale",
               self.init_logit_scale, f"must not exceed max_logit_scale={self.max_logit_scale}")
        self.vision.validate(f"{key}.vision")
        self.text.validate(f"{key}.text")
