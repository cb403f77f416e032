"""A small real data set and a saved tiny model for the embedding and search tests.

Drawn demo scenes (clip_ray.data.demo) in WebDataset shards, one sample of the last
shard cut short so it cannot decode; a BPE trained on the captions; a seeded vit-tiny
saved as a real training checkpoint inside a run directory, whose run config names the
tokenizer (what `clip-ray embed --model RUN_DIR` resolves without --tokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from clip_ray.config import DemoDataConfig
from clip_ray.data.demo.synthetic import draw_sample
from clip_ray.data.formats import ShardWriter
from clip_ray.model import build_model
from clip_ray.model.tokenizer import train_bpe_tokenizer
from clip_ray.worker.checkpoint import save_training_state

BROKEN_KEY = "broken"


@dataclass
class EmbedWorkspace:
    root: Path
    shards: Path
    # key -> (jpeg bytes, caption) of every good sample, in shard order
    samples: dict[str, tuple[bytes, str]]
    tokenizer: Path
    run_dir: Path
    checkpoint: Path
    model: torch.nn.Module


def make_workspace(root: Path, shards: int = 2, per_shard: int = 6) -> EmbedWorkspace:
    demo = DemoDataConfig(image_size=64)
    samples: dict[str, tuple[bytes, str]] = {}
    for shard in range(shards):
        with ShardWriter(str(root / "shards"), 1000, start_index=shard) as writer:
            for i in range(per_shard):
                image, caption, _ = draw_sample(demo, "val", shard * per_shard + i, demo.combos())
                key = f"s{shard}_{i:02d}"
                samples[key] = (image, caption)
                writer.write(key, image, caption, meta={"url": f"https://example.com/{key}.jpg"})
            if shard == shards - 1:  # a JPEG cut short: its header reads, its pixels do not
                writer.write(BROKEN_KEY, image[: len(image) // 3], "a picture that never arrived")
    tokenizer = train_bpe_tokenizer([caption for _, caption in samples.values()] * 4, vocab_size=400)
    tokenizer_path = tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(0)
    model = build_model("vit-tiny").eval()
    run_dir = root / "runs" / "tiny"
    checkpoint = run_dir / "checkpoint_000003"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    save_training_state(checkpoint, model=model, optimizer=optimizer, step=3,
                        config={"data": {"tokenizer": str(tokenizer_path)}})
    return EmbedWorkspace(root=root, shards=root / "shards", samples=samples, tokenizer=tokenizer_path,
                          run_dir=run_dir, checkpoint=checkpoint, model=model)
