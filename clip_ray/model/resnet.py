"""CLIP's modified ResNet image tower (Radford et al. 2021, section 2.4).

Three departures from a torchvision ResNet, all from the paper:
- a stem of three 3x3 convolutions followed by an average pool, not one 7x7
  convolution and a max pool;
- anti-aliased downsampling: every convolution has stride 1 and an average pool
  does the striding (ResNet-D, Zhang 2019);
- the global average pool is replaced by one round of multi-head attention in
  which the spatial mean is the only query.

Parameter and buffer names follow OpenAI's released checkpoints exactly, so their
`visual.*` weights (and OpenCLIP's) load into this module with strict=True.
"""

from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_ray.config import ConfigError, VisionConfig


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; the 3x3 output is average-pooled when the block downsamples."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride > 1 or in_channels != out_channels:
            # OpenAI numbers the parameter-free pool "-1" so the conv and norm keep the
            # torchvision names downsample.0 / downsample.1 in the checkpoints.
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(in_channels, out_channels, 1, bias=False)),
                ("1", nn.BatchNorm2d(out_channels)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.pool(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut, inplace=True)


class AttentionPool2d(nn.Module):
    """Pools a feature map by letting its spatial mean attend over every position (and itself)."""

    def __init__(self, grid_size: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.empty(grid_size ** 2 + 1, width))
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, width, height, grid_width = x.shape
        if height * grid_width + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"a {height}x{grid_width} feature map does not match the positional embedding "
                             f"({self.positional_embedding.shape[0] - 1} positions): wrong image size")
        tokens = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # [B, L, C] -> [B, heads, L, C / heads]
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        # Only the mean token's output is kept, so it is the only query worth computing.
        query = split_heads(self.q_proj(tokens[:, :1]))
        key = split_heads(self.k_proj(tokens))
        value = split_heads(self.v_proj(tokens))
        pooled = F.scaled_dot_product_attention(query, key, value)  # [B, heads, 1, C / heads]
        return self.c_proj(pooled.reshape(batch, width))


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _batch_norm_stats_frozen(module: nn.Module):
    """Lets a checkpointed block re-run its forward in backward without counting the batch twice.

    The recomputation updates throwaway copies of the BatchNorm running statistics; the
    real buffers (already updated once by the first forward) are put back afterwards.
    Switching the updates off instead would change what autograd saves, which the
    checkpoint refuses.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    kept = [{name: getattr(norm, name) for name in _RUNNING_STATS} for norm in norms]
    for norm, buffers in zip(norms, kept):
        for name, buffer in buffers.items():
            setattr(norm, name, buffer.clone())
    try:
        yield
    finally:
        for norm, buffers in zip(norms, kept):
            for name, buffer in buffers.items():
                setattr(norm, name, buffer)


def _checkpoint_contexts(block: nn.Module):
    """(context of the first forward, context of the recomputation) for torch's checkpoint."""
    return contextlib.nullcontext(), _batch_norm_stats_frozen(block)


class ModifiedResNet(nn.Module):
    """Image tower: images [B, 3, H, W] -> features [B, embed_dim]. H = W = config.image_size."""

    def __init__(self, config: VisionConfig, embed_dim: int):
        super().__init__()
        if config.arch != "resnet":
            raise ConfigError(f"model.vision.arch={config.arch!r}: ModifiedResNet needs arch='resnet'")
        config.validate()
        width = config.width
        self.image_size = config.image_size
        self.output_dim = embed_dim
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)

        blocks1, blocks2, blocks3, blocks4 = config.resnet_layers
        expansion = Bottleneck.expansion
        self.layer1 = self._stage(width, width, blocks1, stride=1)
        self.layer2 = self._stage(width * expansion, width * 2, blocks2, stride=2)
        self.layer3 = self._stage(width * 2 * expansion, width * 4, blocks3, stride=2)
        self.layer4 = self._stage(width * 4 * expansion, width * 8, blocks4, stride=2)

        feature_width = width * 8 * expansion  # 32 * width: 2048 for RN50
        self.attnpool = AttentionPool2d(config.image_size // 32, feature_width,
                                        feature_width // config.head_width, embed_dim)
        self.init_parameters()

    @staticmethod
    def _stage(in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
        """The first block changes width and resolution; the rest keep both."""
        first = Bottleneck(in_channels, channels, stride)
        rest = [Bottleneck(channels * Bottleneck.expansion, channels) for _ in range(blocks - 1)]
        return nn.Sequential(first, *rest)

    def init_parameters(self) -> None:
        """OpenAI's scheme: attention projections at std width^-0.5, and every residual
        branch starts as zero (bn3 weight 0) so each block begins as the identity."""
        pool = self.attnpool
        std = pool.c_proj.in_features ** -0.5
        nn.init.normal_(pool.positional_embedding, std=std)
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        for block in self.blocks():
            nn.init.zeros_(block.bn3.weight)

    def blocks(self) -> list[Bottleneck]:
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each bottleneck block in backward instead of storing its activations."""
        self.grad_checkpointing = enable

    def stem(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(images)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        return self.avgpool(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks():
            if self.grad_checkpointing and torch.is_grad_enabled():
                if torch.compiler.is_compiling():
                    # Dynamo accepts no custom recompute context: under torch.compile the
                    # recomputation updates the BatchNorm running statistics a second time
                    # (as if momentum were ~0.19 instead of 0.1); eval statistics stay sound.
                    x = checkpoint(block, x, use_reentrant=False)
                else:
                    contexts = functools.partial(_checkpoint_contexts, block)
                    x = checkpoint(block, x, use_reentrant=False, context_fn=contexts)
            else:
                x = block(x)
        return self.attnpool(x)
