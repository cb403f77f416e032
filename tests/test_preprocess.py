"""Image transforms and batch assembly on real Flickr8k photos, without Ray."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from clip_ray.data.formats import FailureCounts, FailureReason, Sample, load_split
from clip_ray.data.stream.preprocess import (
    CLIP_MEAN, CLIP_STD, CROP_RATIO, Preprocessor, center_square_box, draft_size_for, normalize, normalize_on_device,
    random_resized_crop_box, sample_rng,
)
from clip_ray.model.tokenizer import train_bpe_tokenizer

CONTEXT_LENGTH = 24


@pytest.fixture(scope="module")
def photos(flickr8k_dir) -> list[Sample]:
    names = load_split(flickr8k_dir / "splits" / "test.txt")[:8]
    return [Sample(key=name.rsplit(".", 1)[0], image=(flickr8k_dir / "images" / name).read_bytes(),
                   caption=f"a photo called {name}", source="flickr-test") for name in names]


@pytest.fixture(scope="module")
def tokenizer(flickr8k_dir):
    captions = (flickr8k_dir / "captions.csv").read_text().splitlines()[1:2000]
    return train_bpe_tokenizer(captions, vocab_size=512)


def _large_jpeg(sample: Sample, size: tuple[int, int]) -> bytes:
    """A real photo upscaled and re-encoded, so draft decoding has something to skip."""
    image = Image.open(io.BytesIO(sample.image)).convert("RGB").resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=92)
    return out.getvalue()


def test_center_crop_matches_torchvision_resize_then_center_crop(photos, tokenizer):
    transforms = pytest.importorskip("torchvision.transforms")
    wide = Sample("wide", _large_jpeg(photos[0], (300, 180)), "x")
    reference = transforms.Compose([transforms.Resize(96, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(96)])
    prepare = Preprocessor(96, CONTEXT_LENGTH, tokenizer, train=False)
    for sample in [wide, *photos[:3]]:
        ours = prepare.image(sample)
        theirs = np.asarray(reference(Image.open(io.BytesIO(sample.image)).convert("RGB")))
        assert ours.shape == (96, 96, 3) and ours.dtype == np.uint8
        # Same geometry; the box resize skips one rounding of the crop offset, so allow a sliver.
        assert np.abs(ours.astype(int) - theirs.astype(int)).mean() < 4
    assert center_square_box(300, 180) == (60, 0, 240, 180)


def test_random_resized_crop_box_respects_scale_and_ratio():
    rng = random.Random(0)
    fallbacks = 0
    for _ in range(2000):
        width, height = rng.randint(50, 800), rng.randint(50, 800)
        left, top, right, bottom = random_resized_crop_box(width, height, (0.3, 0.9), rng)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        crop_w, crop_h = right - left, bottom - top
        aspect = crop_w / crop_h
        if math.isclose(left + right, width) and math.isclose(top + bottom, height):  # the centred fallback
            fallbacks += CROP_RATIO[0] <= width / height <= CROP_RATIO[1]
            assert math.isclose(crop_w, width) or math.isclose(crop_h, height)
            assert CROP_RATIO[0] - 1e-9 <= aspect <= CROP_RATIO[1] + 1e-9 or math.isclose(aspect, width / height)
        else:
            assert 0.3 - 1e-9 <= crop_w * crop_h / (width * height) <= 0.9 + 1e-9
            assert CROP_RATIO[0] - 1e-9 <= aspect <= CROP_RATIO[1] + 1e-9
    assert fallbacks < 5  # only elongated images fall back


def test_random_resized_crop_falls_back_to_centre_for_extreme_shapes():
    # A 1000x10 strip fits no crop of aspect <= 4/3 and area >= 0.5: the centred 13.3x10 is used.
    left, top, right, bottom = random_resized_crop_box(1000, 10, (0.5, 1.0), random.Random(0))
    assert (top, bottom) == (0, 10) and right - left == pytest.approx(40 / 3) and left + right == 1000


def test_random_resized_crop_is_seeded_per_sample_and_epoch(photos, tokenizer):
    epoch0 = Preprocessor(64, CONTEXT_LENGTH, tokenizer, train=True, crop_scale=(0.2, 1.0), seed=3, epoch=0)
    again = Preprocessor(64, CONTEXT_LENGTH, tokenizer, train=True, crop_scale=(0.2, 1.0), seed=3, epoch=0)
    epoch1 = Preprocessor(64, CONTEXT_LENGTH, tokenizer, train=True, crop_scale=(0.2, 1.0), seed=3, epoch=1)
    for sample in photos[:4]:
        first = epoch0.image(sample)
        assert first.shape == (64, 64, 3)
        assert np.array_equal(first, again.image(sample))
        assert not np.array_equal(first, epoch1.image(sample))
    assert sample_rng(0, 0, "s", "a").random() != sample_rng(0, 0, "s", "b").random()


def test_draft_decode_keeps_crops_sharp_and_close(photos, tokenizer):
    big = Sample("big", _large_jpeg(photos[1], (1024, 768)), "x", source="s")
    prepare = Preprocessor(64, CONTEXT_LENGTH, tokenizer, train=True, crop_scale=(0.9, 1.0))
    assert prepare.draft_size == draft_size_for(64, True, (0.9, 1.0)) == math.ceil(64 / math.sqrt(0.9 * 0.75))
    full = Preprocessor(64, CONTEXT_LENGTH, tokenizer, train=True, crop_scale=(0.9, 1.0))
    full.draft_size = None
    # The drafted decode is 1/8 scale (128x96); the crop is drawn in fractions of the image, so it is
    # the same region, and a 64 px crop of it loses little against one from the full 1024x768.
    drafted, exact = prepare.image(big), full.image(big)
    assert np.abs(drafted.astype(int) - exact.astype(int)).mean() < 4
    assert draft_size_for(64, False, (0.9, 1.0)) == 64


def test_normalize_matches_the_textbook_formula_and_the_gpu_helper(photos, tokenizer):
    prepare = Preprocessor(32, CONTEXT_LENGTH, tokenizer, train=False)
    pixels = np.stack([prepare.image(s) for s in photos]).transpose(0, 3, 1, 2)
    expected = (torch.from_numpy(pixels.copy()).float() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    ours = normalize(pixels)
    assert ours.dtype == np.float32 and ours.shape == pixels.shape and ours.flags["C_CONTIGUOUS"]
    torch.testing.assert_close(torch.from_numpy(ours), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(normalize_on_device(torch.from_numpy(np.ascontiguousarray(pixels))), expected,
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("uint8_images", [False, True])
def test_batch_has_fixed_shapes_and_counts_bad_images(photos, tokenizer, uint8_images):
    bad = [Sample("truncated", photos[0].image[: len(photos[0].image) // 2], "cut off"),
           Sample("html", b"<html>not a photo</html>", "a web page")]
    prepare = Preprocessor(48, CONTEXT_LENGTH, tokenizer, train=True, uint8_images=uint8_images)
    counts = FailureCounts()
    batch = prepare.batch([photos[0], bad[0], *photos[1:4], bad[1]], counts)
    assert counts.ok == 4 and counts.failed == {"truncated_image": 1, "not_an_image": 1}
    assert counts[FailureReason.TRUNCATED_IMAGE] == 1
    assert batch["image"].shape == (4, 3, 48, 48)
    assert batch["image"].dtype == (np.uint8 if uint8_images else np.float32)
    assert batch["text"].shape == (4, CONTEXT_LENGTH) and batch["text"].dtype == np.int64
    assert list(batch["key"]) == [s.key for s in photos[:4]]
    assert np.array_equal(batch["text"], tokenizer([s.caption for s in photos[:4]], CONTEXT_LENGTH).numpy())
    assert (batch["text"][:, 0] == tokenizer.sot_token_id).all()
    if uint8_images:
        assert np.array_equal(batch["image"][1].transpose(1, 2, 0), prepare.image(photos[1]))
    else:
        low = min((0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
        high = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
        assert low - 1e-5 <= batch["image"].min() and batch["image"].max() <= high + 1e-5
        assert batch["image"].std() > 0.3  # real photos, not a constant
    assert prepare.batch(bad, FailureCounts()) is None
