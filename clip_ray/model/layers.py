"""The Transformer pieces both towers share.

Parameter names follow OpenAI's CLIP exactly (`ln_1`, `attn.in_proj_weight`,
`attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`) so released checkpoints load
with strict=True. Attention is written out with `F.scaled_dot_product_attention`
instead of `nn.MultiheadAttention`: it picks the fastest kernel available, and
torch.compile traces it without graph breaks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's released weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation_layer(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}: expected 'gelu' or 'quick_gelu'")


class LayerNorm(nn.LayerNorm):
    """LayerNorm that hands back its input's dtype.

    CUDA autocast computes layer_norm in float32 and returns float32 (CPU autocast
    leaves it alone). With the plain module the residual stream becomes float32 after
    the first norm, so every add and norm under bf16 moves twice the bytes and the
    saved activations double.
    Normalising in float32 and casting back keeps the stream in the compute dtype,
    as OpenAI's fp16 model did. Same parameters, same state-dict keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast computes in on x's device, or x's own dtype outside autocast."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class SelfAttention(nn.Module):
    """Multi-head self-attention over [batch, tokens, width], laid out like nn.MultiheadAttention's weights."""

    def __init__(self, width: int, heads: int, causal: bool):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal
        # One packed projection for queries, keys and values (rows in that order), as OpenAI stores it.
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # [B, T, 3W] -> three tensors of [B, heads, T, head_width]
        q, k, v = qkv.view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(batch, tokens, width)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.act = activation_layer(activation)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str, causal: bool):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln_2 = LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio), activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, activation: str,
                 causal: bool = False):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualBlock(width, heads, mlp_ratio, activation, causal) for _ in range(layers))
        # Recomputing each block in the backward pass trades ~30% more compute for activation memory.
        self.grad_checkpointing = False

    @classmethod
    def for_tower(cls, config, activation: str, causal: bool) -> "Transformer":
        """The trunk a tower's config describes; configs give head_width, so width sets the head count."""
        return cls(config.width, config.layers, config.width // config.head_width, config.mlp_ratio, activation,
                   causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    @torch.no_grad()
    def init_parameters(self) -> None:
        """OpenAI's scheme: projections into the residual stream shrink with depth so its variance stays bounded."""
        layers = len(self.resblocks)
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias,
                         block.mlp.c_proj.bias):
                nn.init.zeros_(bias)


def embedding_head(width: int, embed_dim: int) -> tuple[LayerNorm, nn.Parameter]:
    """A tower's exit into the shared embedding space: a last LayerNorm, then a bias-free projection
    (left uninitialised: each tower scales it its own way, as OpenAI's do)."""
    return LayerNorm(width), nn.Parameter(torch.empty(width, embed_dim))
