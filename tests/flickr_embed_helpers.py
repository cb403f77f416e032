"""Real Flickr8k photos and a briefly trained small CLIP for the embedding job's acceptance tests.

`caption_folder` writes a caption-table input (`--input-format csv`): a folder holding
captions.csv for the first N photos of a split, in the split's order, and `images`, a link to
the shared photos. `train_small_clip` trains a two-layer ViT CLIP on train-split photos for
150 CPU steps of 64 pairs and saves it as a run directory (checkpoint + tokenizer) that
`clip-ray embed --model RUN_DIR` resolves: trained features are spread apart, so a ranking does
not hang on near-ties the way a random model's almost identical features would.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.data.formats import Sample
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.loss import ClipLoss
from clip_ray.model import build_model, clamp_logit_scale
from clip_ray.model.tokenizer import train_bpe_tokenizer
from clip_ray.worker.checkpoint import save_training_state

IMAGE_SIZE = 32
CONTEXT_LENGTH = 32


def flickr_captions(flickr8k_dir: Path) -> dict[str, list[str]]:
    """Image name -> its captions, in file order."""
    table: dict[str, list[str]] = {}
    with open(flickr8k_dir / "captions.csv", newline="") as file:
        for row in csv.DictReader(file):
            table.setdefault(row["image"], []).append(row["caption"])
    return table


def split_names(flickr8k_dir: Path, split: str, count: int) -> list[str]:
    return (flickr8k_dir / "splits" / f"{split}.txt").read_text().split()[:count]


def caption_folder(flickr8k_dir: Path, root: Path, split: str, photos: int) -> tuple[Path, list[tuple[str, str]]]:
    """(a csv input folder of the split's first `photos` photos, its (image, caption) rows in file order)."""
    table = flickr_captions(flickr8k_dir)
    rows = [(name, caption) for name in split_names(flickr8k_dir, split, photos) for caption in table[name]]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    (root / "images").symlink_to((flickr8k_dir / "images").resolve(), target_is_directory=True)
    return root, rows


@dataclass
class SmallClip:
    run_dir: Path
    tokenizer: Path
    model: torch.nn.Module  # the saved weights, in eval mode
    preprocessor: Preprocessor  # the embedding job's preprocessing (centre crop, tokenizer) for this model


def small_config(vocab_size: int, width: int = 64, layers: int = 2) -> ModelConfig:
    return ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=IMAGE_SIZE, patch_size=8, width=width, layers=layers, head_width=32),
        text=TextConfig(context_length=CONTEXT_LENGTH, vocab_size=vocab_size, width=width, layers=layers,
                        head_width=32),
    )


def train_small_clip(flickr8k_dir: Path, root: Path, photos: int = 512, steps: int = 150, batch: int = 64,
                     lr: float = 1e-3, width: int = 64, layers: int = 2, seed: int = 0) -> SmallClip:
    """A small CLIP trained on the first `photos` train-split photos (a random one of each photo's
    captions per step), saved as ROOT/runs/small/checkpoint_<steps> whose run config names the tokenizer.
    150 steps of 64 (about 7 s of one CPU) spread the test photos' features apart (mean cosine
    between two photos about 0.45, against 0.89 untrained); steps=0 saves the initial weights.
    `width` and `layers` are both towers'."""
    table = flickr_captions(flickr8k_dir)
    names = split_names(flickr8k_dir, "train", photos)
    tokenizer = train_bpe_tokenizer([c for name in names for c in table[name]], vocab_size=1000)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer_path = tokenizer.save(root / "tokenizer.json")
    prepare = Preprocessor(IMAGE_SIZE, CONTEXT_LENGTH, tokenizer, train=False)
    pixels = np.stack([prepare.image(Sample(key=name, image=(flickr8k_dir / "images" / name).read_bytes(),
                                            caption="")) for name in names])
    images = torch.from_numpy(normalize(pixels.transpose(0, 3, 1, 2)))
    tokens = [torch.from_numpy(prepare.text(table[name])) for name in names]

    torch.manual_seed(seed)
    model = build_model(small_config(tokenizer.vocab_size, width, layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss_fn = ClipLoss()
    draw = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randperm(len(names), generator=draw)[:batch]
        picks = torch.randint(0, 5, (len(rows),), generator=draw)
        texts = torch.stack([tokens[row][pick % len(tokens[row])] for row, pick in zip(rows.tolist(), picks.tolist())])
        out = model(images[rows], texts)
        loss = loss_fn(out.image_features, out.text_features, out.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clamp_logit_scale(model)
    model.eval()
    run_dir = root / "runs" / "small"
    save_training_state(run_dir / f"checkpoint_{steps:06d}", model=model, optimizer=optimizer, step=steps,
                        config={"data": {"tokenizer": str(tokenizer_path)}})
    return SmallClip(run_dir=run_dir, tokenizer=tokenizer_path, model=model, preprocessor=prepare)
