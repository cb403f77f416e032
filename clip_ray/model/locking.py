"""Locking towers: training one tower (or the last blocks of one) against a frozen other.

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning") keeps a pretrained image tower
fixed and trains a text tower to read its embeddings: the cheapest route to a strong CLIP. `lock_towers` freezes
what `model.lock_image` / `model.lock_text` ask for, before the model is wrapped and the optimiser built, so frozen
parameters are in neither the optimiser nor DDP's gradient buckets nor FSDP's reduce-scatter.

A tower is cut into a stem, an ordered list of blocks and a head:

  tower         stem                                           blocks                  head
  ViT           conv1, class/positional embedding, ln_pre      transformer.resblocks   ln_post, proj
  ModifiedResNet conv1..bn3 (the three-conv stem)               layer1 .. layer4        attnpool (it projects)
  text          token_embedding, positional_embedding          transformer.resblocks   ln_final, text_projection

Locking with `unlocked_blocks = N` freezes everything but the last N blocks and the head; N = 0 freezes the whole
tower, head included. A ResNet's stages count as its blocks (OpenCLIP locks a ModifiedResNet only whole). The
temperature (and SigLIP's bias) belong to neither tower and stay trainable.

A locked ResNet's BatchNorms (those whose affine parameters are frozen) also stop updating their running
statistics, with `lock_image_freeze_bn_stats`: they become `FrozenStatsBatchNorm2d`, which stays in eval mode
through every `model.train()`, so a locked stage computes in training exactly what it computes at inference. The
class changes, not the parameters or buffers: state dicts keep OpenAI's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from clip_ray.config import ConfigError, ModelConfig
from clip_ray.model.clip import CLIP
from clip_ray.model.resnet import ModifiedResNet
from clip_ray.model.vit import VisionTransformer

# Parameters outside both towers: the learned temperature and SigLIP's bias.
SHARED_NAMES = ("logit_scale", "logit_bias")
IMAGE_PREFIX = "visual."


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d that normalises with its running statistics and never updates them, in train mode too.

    Same parameters and buffers as the BatchNorm2d it replaces (its class is swapped in place), so state dicts,
    checkpoints and exports are unchanged.
    """

    def train(self, mode: bool = True) -> "FrozenStatsBatchNorm2d":
        return super().train(False)


@dataclass(frozen=True)
class TowerLock:
    """What locking did to one tower: parameter counts (elements) and what stays trainable."""

    locked: bool
    unlocked_blocks: int      # of `blocks`; meaningful when locked
    blocks: int
    locked_params: int
    trainable_params: int
    frozen_batch_norms: int = 0

    def describe(self, tower: str) -> str:
        total = self.locked_params + self.trainable_params
        if not self.locked:
            return f"{tower} tower trainable ({total:,} parameters)"
        kept = "nothing" if self.unlocked_blocks == 0 else f"the last {self.unlocked_blocks} of {self.blocks} " \
            "blocks and the head"
        text = f"{tower} tower locked: {self.locked_params:,} of {total:,} parameters frozen, {kept} trainable"
        if self.frozen_batch_norms:
            text += f", running statistics frozen in {self.frozen_batch_norms} BatchNorm layers"
        return text


@dataclass(frozen=True)
class LockSummary:
    image: TowerLock
    text: TowerLock
    shared_trainable_params: int  # temperature (and bias)

    @property
    def trainable_params(self) -> int:
        return self.image.trainable_params + self.text.trainable_params + self.shared_trainable_params

    @property
    def locked_params(self) -> int:
        return self.image.locked_params + self.text.locked_params

    def as_dict(self) -> dict[str, int]:
        """Flat counts, for MLflow params or metrics."""
        return {"image_locked_params": self.image.locked_params, "image_trainable_params": self.image.trainable_params,
                "text_locked_params": self.text.locked_params, "text_trainable_params": self.text.trainable_params,
                "frozen_batch_norms": self.image.frozen_batch_norms, "trainable_params": self.trainable_params}

    def __str__(self) -> str:
        return f"{self.image.describe('image')}; {self.text.describe('text')}"


def tower_blocks(model: CLIP, tower: str) -> tuple[list[nn.Module], list[nn.Module | nn.Parameter]]:
    """(blocks in order, head) of the image or text tower: what `unlocked_blocks` counts and keeps trainable."""
    if tower == "text":
        return list(model.transformer.resblocks), [model.ln_final, model.text_projection]
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        return list(visual.transformer.resblocks), [visual.ln_post, visual.proj]
    if isinstance(visual, ModifiedResNet):
        return [visual.layer1, visual.layer2, visual.layer3, visual.layer4], [visual.attnpool]
    raise TypeError(f"cannot lock an image tower of type {type(visual).__name__}")


def _parameters(items: Iterable[nn.Module | nn.Parameter]) -> Iterable[nn.Parameter]:
    for item in items:
        yield from [item] if isinstance(item, nn.Parameter) else item.parameters()


def _tower_parameters(model: CLIP, tower: str) -> list[nn.Parameter]:
    in_image = tower == "image"
    return [p for name, p in model.named_parameters()
            if name not in SHARED_NAMES and name.startswith(IMAGE_PREFIX) == in_image]


def _lock_tower(model: CLIP, tower: str, unlocked_blocks: int) -> None:
    blocks, head = tower_blocks(model, tower)
    if not 0 <= unlocked_blocks <= len(blocks):
        raise ConfigError(f"model.lock_{tower}_unlocked_blocks={unlocked_blocks}: the {tower} tower has "
                          f"{len(blocks)} blocks")
    for param in _tower_parameters(model, tower):
        param.requires_grad_(False)
    if unlocked_blocks:
        for param in _parameters([*blocks[len(blocks) - unlocked_blocks:], *head]):
            param.requires_grad_(True)


def freeze_locked_batch_norm_stats(module: nn.Module) -> int:
    """Turns every BatchNorm2d of `module` whose affine parameters are frozen into a FrozenStatsBatchNorm2d;
    returns how many are frozen now."""
    frozen = 0
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d) and not any(p.requires_grad for p in norm.parameters(recurse=False)):
            if type(norm) is nn.BatchNorm2d:
                norm.__class__ = FrozenStatsBatchNorm2d
            frozen += isinstance(norm, FrozenStatsBatchNorm2d)
            norm.eval()
    return frozen


def _summary(model: CLIP, tower: str, locked: bool, unlocked_blocks: int, frozen_norms: int = 0) -> TowerLock:
    params = _tower_parameters(model, tower)
    blocks = len(tower_blocks(model, tower)[0])
    return TowerLock(locked=locked, unlocked_blocks=unlocked_blocks if locked else blocks, blocks=blocks,
                     locked_params=sum(p.numel() for p in params if not p.requires_grad),
                     trainable_params=sum(p.numel() for p in params if p.requires_grad),
                     frozen_batch_norms=frozen_norms)


def lock_towers(model: CLIP, config: ModelConfig) -> LockSummary:
    """Freezes the parameters `config.lock_*` ask for (requires_grad=False) and, for a locked ResNet with
    `lock_image_freeze_bn_stats`, the running statistics of its locked BatchNorms.

    Call it on the bare model, before DDP/FSDP wrap it and before the optimiser is built: both take only
    parameters that require gradients. A tower that is not locked is left as it is.
    """
    if not isinstance(model, CLIP):
        raise TypeError(f"lock_towers needs the bare CLIP model (before DDP/FSDP/compile), got {type(model).__name__}")
    frozen_norms = 0
    if config.lock_image:
        _lock_tower(model, "image", config.lock_image_unlocked_blocks)
        if config.lock_image_freeze_bn_stats:
            frozen_norms = freeze_locked_batch_norm_stats(model.visual)
    if config.lock_text:
        _lock_tower(model, "text", config.lock_text_unlocked_blocks)
    shared = sum(p.numel() for name, p in model.named_parameters() if name in SHARED_NAMES and p.requires_grad)
    return LockSummary(image=_summary(model, "image", config.lock_image, config.lock_image_unlocked_blocks,
                                      frozen_norms),
                       text=_summary(model, "text", config.lock_text, config.lock_text_unlocked_blocks),
                       shared_trainable_params=shared)
