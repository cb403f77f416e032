"""Tiny models, random batches and a two-rank gloo launcher for the training-step tests."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp

from clip_ray.config import ModelConfig, TextConfig, VisionConfig

TINY_VIT = ModelConfig(embed_dim=16, vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=1, head_width=16),
                       text=TextConfig(context_length=8, vocab_size=64, width=32, layers=1, head_width=16))
TINY_RESNET = ModelConfig(embed_dim=16, vision=VisionConfig(arch="resnet", image_size=32, width=8,
                                                            resnet_layers=(1, 1, 1, 1), head_width=8),
                          text=TextConfig(context_length=8, vocab_size=64, width=32, layers=1, head_width=16))


def random_batch(n: int, config: ModelConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images and token rows shaped for `config`, the same for a seed on every rank."""
    g = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    texts = torch.randint(1, config.text.vocab_size, (n, config.text.context_length), generator=g)
    return images, texts


def run_on_two_ranks(worker, out_dir: str | None = None) -> list[dict]:
    """Spawns `worker(rank, 2, init_file, out_dir)` on two gloo ranks; what each saved as rank<r>.pt.
    `out_dir` (kept) or a temporary directory (removed) holds the rendezvous file and the results."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = out_dir or tmp
        mp.spawn(worker, args=(2, os.path.join(out_dir, "init"), out_dir), nprocs=2, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(2)]
