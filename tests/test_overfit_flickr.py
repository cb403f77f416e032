"""A tiny CLIP memorises 32 real Flickr8k image-caption pairs.

The whole stack (tokenizer trained on the captions, both towers, the contrastive
loss, the temperature clamp) has to be right for image-to-text retrieval over the
32 pairs to reach 1.0 in a few hundred CPU steps.
"""

import csv

import torch
from PIL import Image

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.loss import ClipLoss
from clip_ray.model import build_model, clamp_logit_scale
from clip_ray.model.tokenizer import train_bpe_tokenizer

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def _load_pairs(flickr8k_dir, count, size):
    first_caption = {}
    with open(flickr8k_dir / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            first_caption.setdefault(row["image"], row["caption"])
    names = (flickr8k_dir / "splits" / "train.txt").read_text().split()[:count]
    images = []
    for name in names:
        with Image.open(flickr8k_dir / "images" / name) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
            pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
            images.append(pixels.view(size, size, 3).permute(2, 0, 1).float() / 255)
    return (torch.stack(images) - MEAN) / STD, [first_caption[n] for n in names]


def test_tiny_clip_memorises_32_flickr_pairs(flickr8k_dir):
    torch.manual_seed(0)
    images, captions = _load_pairs(flickr8k_dir, count=32, size=32)
    tokenizer = train_bpe_tokenizer(captions, vocab_size=512, min_frequency=1)
    tokens = tokenizer(captions, context_length=32)
    config = ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text=TextConfig(context_length=32, vocab_size=tokenizer.vocab_size, width=64, layers=2, head_width=32),
    )
    model = build_model(config)
    loss_fn = ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)

    def image_to_text_accuracy():
        model.eval()
        with torch.no_grad():
            out = model(images, tokens)
        model.train()
        predicted = (out.image_features @ out.text_features.T).argmax(dim=1)
        return (predicted == torch.arange(len(captions))).float().mean().item()

    start_accuracy = image_to_text_accuracy()
    accuracy, step = start_accuracy, 0
    for step in range(1, 401):
        out = model(images, tokens)
        loss = loss_fn(out.image_features, out.text_features, out.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        clamp_logit_scale(model)
        if step % 25 == 0:
            accuracy = image_to_text_accuracy()
            if accuracy == 1.0:
                break
    assert start_accuracy < 0.5
    assert accuracy == 1.0, f"image-to-text accuracy {accuracy:.3f} after {step} steps"
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4
