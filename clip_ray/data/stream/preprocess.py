"""Turning raw image-text samples into fixed-shape model batches, on numpy, without Ray.

Per sample: decode (JPEGs at reduced scale when the crop allows) -> RGB ->
random-resized crop (training) or centre square (evaluation), resized bicubic to
`image_size` in one PIL call. Per batch: stack to uint8 NCHW, then CLIP's mean/std
normalisation to float32 NCHW, or leave uint8 for `normalize_on_device` to finish
on the GPU (4x fewer bytes through the object store and the host-to-device copy).
Captions become a fixed-length int64 [N, context_length] array.

The crop of a sample is drawn from a generator seeded by (seed, epoch, source,
key), so an epoch's pixels are the same whichever process or node preprocesses
it, and another epoch crops differently.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from clip_ray.data.formats.samples import DEFAULT_MAX_PIXELS, BadSample, FailureCounts, Sample, decode_image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Aspect ratios (width / height) a training crop may have, as in the Inception crop.
CROP_RATIO = (3 / 4, 4 / 3)
# Tries at drawing a crop that fits before falling back to the centred one.
CROP_TRIES = 10

# x / 255 then (x - mean) / std, folded into one multiply and one add.
_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, dtype=np.float32))).reshape(1, 3, 1, 1)
_OFFSET = (-np.asarray(CLIP_MEAN, dtype=np.float32) / np.asarray(CLIP_STD, dtype=np.float32)).reshape(1, 3, 1, 1)

Box = tuple[float, float, float, float]  # left, top, right, bottom in pixels, as PIL's resize(box=) takes it


def sample_rng(seed: int, epoch: int, source: str, key: str) -> random.Random:
    """A generator of its own for one sample; str seeds hash identically in every process."""
    return random.Random(f"{seed}/{epoch}/{source}/{key}")


def random_resized_crop_box(
    width: int, height: int, scale: tuple[float, float], rng: random.Random, ratio: tuple[float, float] = CROP_RATIO,
) -> Box:
    """A crop covering `scale` of the area with an aspect ratio in `ratio`, placed uniformly.

    The box is in fractional pixels and drawn from fractions of the image, so a
    JPEG decoded at reduced scale (draft) gets the same region as a full decode.
    When CROP_TRIES draws do not fit inside the image (a very wide or tall photo),
    the largest centred crop whose aspect ratio is within `ratio` is used.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(CROP_TRIES):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w, crop_h = math.sqrt(target_area * aspect), math.sqrt(target_area / aspect)
        if crop_w <= width and crop_h <= height:
            left = rng.random() * (width - crop_w)
            top = rng.random() * (height - crop_h)
            return left, top, left + crop_w, top + crop_h
    crop_w, crop_h = min(width, height * ratio[1]), min(height, width / ratio[0])
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def center_square_box(width: int, height: int) -> Box:
    """The centred square of side min(width, height).

    Resizing it to S x S is "resize the shorter side to S, then centre-crop S",
    without the intermediate image and its rounding of the crop offset.
    """
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def draft_size_for(image_size: int, train: bool, crop_scale: tuple[float, float]) -> int:
    """How small a JPEG may be decoded (shorter side) and still give every crop >= image_size pixels.

    A training crop's shorter side is at least sqrt(min_scale * 3/4) of a square
    photo's side; evaluation uses the whole shorter side.
    """
    if not train:
        return image_size
    return math.ceil(image_size / math.sqrt(crop_scale[0] * min(CROP_RATIO[0], 1 / CROP_RATIO[1])))


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NCHW -> float32 NCHW with CLIP's mean and std."""
    # A contiguous input makes a contiguous output, and both passes run at memory speed.
    out = np.multiply(np.ascontiguousarray(images_uint8), _SCALE, dtype=np.float32)
    out += _OFFSET
    return out


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW (already on the GPU) -> float32 NCHW normalised like `normalize`."""
    scale = torch.as_tensor(_SCALE, device=images.device)
    offset = torch.as_tensor(_OFFSET, device=images.device)
    return torch.addcmul(offset, images.float(), scale)


@dataclass
class Preprocessor:
    """Raw samples -> {"image", "text", "key", "image_id", "kept"} batches of fixed per-row shape.

    `tokenize` is a clip_ray tokenizer (texts, context_length) -> LongTensor [N, L].
    Images that fail to decode are skipped and counted in the batch call's `counts`.
    """

    image_size: int
    context_length: int
    tokenize: Callable[..., torch.Tensor]
    train: bool = True
    crop_scale: tuple[float, float] = (0.9, 1.0)
    uint8_images: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0
    epoch: int = 0

    def __post_init__(self) -> None:
        self.draft_size = draft_size_for(self.image_size, self.train, self.crop_scale)

    def image(self, sample: Sample, unit: str | None = None) -> np.ndarray:
        """HWC uint8 [image_size, image_size, 3]; raises BadSample for an undecodable image.

        The crop is seeded by (seed, epoch, unit, key); `unit` names the sample's shard within its
        source (the pipeline passes it, so crops do not depend on where the data lives), else its
        source path."""
        image = decode_image(sample.image, self.max_pixels, self.draft_size)
        if self.train:
            rng = sample_rng(self.seed, self.epoch, sample.source if unit is None else unit, sample.key)
            box = random_resized_crop_box(image.width, image.height, self.crop_scale, rng)
        else:
            box = center_square_box(image.width, image.height)
        size = (self.image_size, self.image_size)
        return np.asarray(image.resize(size, Image.Resampling.BICUBIC, box=box))

    def text(self, captions: Sequence[str]) -> np.ndarray:
        tokens = self.tokenize(list(captions), context_length=self.context_length)
        return np.asarray(tokens, dtype=np.int64)

    def batch(self, samples: Sequence[Sample], counts: FailureCounts,
              unit: str | None = None) -> dict[str, np.ndarray] | None:
        """The usable samples as one batch (None if none decodes); `counts` gets this stage's tally.

        "kept" holds each row's index in `samples`, so a caller can tell which samples were skipped."""
        pixels = np.empty((len(samples), 3, self.image_size, self.image_size), dtype=np.uint8)
        kept: list[Sample] = []
        kept_indices: list[int] = []
        for index, sample in enumerate(samples):
            try:
                image = self.image(sample, unit)
            except BadSample as bad:
                counts.reject(bad.reason, sample.source, sample.key, bad.detail)
                continue
            counts.accept()
            # HWC -> CHW one image at a time: it stays in cache, unlike a transpose of the whole batch.
            pixels[len(kept)] = image.transpose(2, 0, 1)
            kept.append(sample)
            kept_indices.append(index)
        if not kept:
            return None
        pixels = pixels[: len(kept)]
        return {
            "image": pixels if self.uint8_images else normalize(pixels),
            "text": self.text([s.caption for s in kept]),
            "key": np.array([s.key for s in kept], dtype=object),
            # What retrieval groups captions by: the photo (meta["image"] for caption tables), else the sample.
            "image_id": np.array([str(s.meta.get("image", s.key)) for s in kept], dtype=object),
            "kept": np.array(kept_indices, dtype=np.int64),
        }
