"""CLIP's Vision Transformer image tower (Dosovitskiy et al. 2020, as used by Radford et al. 2021).

The one change from OpenAI's version is FLIP-style patch dropout (Li et al. 2023):
while training, a random subset of patch tokens is dropped before the
Transformer, which cuts compute roughly in proportion and acts as a regulariser.
A caller that must reproduce the drop exactly (the accumulated training step
encodes each micro-batch twice, possibly compiled) draws the kept indices
itself (`patch_keep_indices`) and passes them in.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_ray.config import VisionConfig
from clip_ray.model.layers import LayerNorm, Transformer, embedding_head


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int, activation: str):
        super().__init__()
        width = config.width
        grid = config.image_size // config.patch_size
        self.patch_dropout = config.patch_dropout
        # Patch embedding without bias: a bias would only duplicate the positional embedding.
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer.for_tower(config, activation, causal=False)
        self.ln_post, self.proj = embedding_head(width, embed_dim)
        self.init_parameters()

    @torch.no_grad()
    def init_parameters(self) -> None:
        scale = self.proj.shape[0] ** -0.5
        for param in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(param, std=scale)
        self.transformer.init_parameters()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def patch_keep_indices(self, batch: int, device: torch.device | str) -> torch.Tensor | None:
        """[batch, kept] indices of the patch tokens a training pass keeps (a random subset per image, the
        same count for all, so the batch stays dense); None when this tower drops nothing."""
        if self.patch_dropout <= 0:
            return None
        tokens = self.positional_embedding.shape[0] - 1
        keep = max(1, int(tokens * (1.0 - self.patch_dropout)))
        return torch.rand(batch, tokens, device=device).topk(keep, dim=1).indices

    def forward(self, images: torch.Tensor, patch_keep: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_keep`: the patches to keep (patch_keep_indices); by default drawn here while training."""
        x = self.conv1(images)                            # [B, W, grid, grid]
        x = x.flatten(2).transpose(1, 2)                  # [B, grid*grid, W]
        x = x + self.positional_embedding[1:].to(x.dtype)
        if patch_keep is None and self.training:
            patch_keep = self.patch_keep_indices(x.shape[0], x.device)
        if patch_keep is not None:
            x = x.gather(1, patch_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype)
        x = torch.cat([cls.expand(x.shape[0], 1, -1), x], dim=1)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj
