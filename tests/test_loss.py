"""The contrastive losses on one process, against references written another way.

The references build the full N x N similarity matrix and spell each loss out
(log-softmax both ways; an explicit pairwise sum of sigmoid terms) in float64.
The multi-process equivalence lives in test_loss_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clip_ray.loss import ClipLoss, LossOutput, SigLipLoss, build_loss, gather_features


def random_pairs(n: int, dim: int = 16, seed: int = 0, dtype=torch.float32, noise: float = 0.8):
    """Unit-norm image features and caption features near them (closer for smaller `noise`)."""
    g = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(images + noise * torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return images.to(dtype), texts.to(dtype)


def reference_clip(images, texts, scale) -> float:
    """Mean of -log p(correct) over rows of the similarity matrix and over its columns."""
    sims = scale * images.double() @ texts.double().T
    image_to_text = -torch.diagonal(sims.log_softmax(dim=1)).mean()
    text_to_image = -torch.diagonal(sims.log_softmax(dim=0)).mean()
    return float((image_to_text + text_to_image) / 2)


def reference_siglip(images, texts, scale, bias) -> float:
    """-(1/N) sum over every (i, j) pair of log sigmoid(+-(scale * <img_i, txt_j> + bias))."""
    images, texts = images.double().tolist(), texts.double().tolist()
    n, total = len(images), 0.0
    for i in range(n):
        for j in range(n):
            z = scale * sum(a * b for a, b in zip(images[i], texts[j])) + bias
            sign = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-sign * z)))
    return total / n


@pytest.mark.parametrize("n", [1, 5, 12])
def test_clip_loss_matches_reference(n):
    images, texts = random_pairs(n)
    scale = torch.tensor(14.3)
    loss = ClipLoss()(images, texts, scale)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(reference_clip(images, texts, 14.3), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n", [1, 5, 12])
def test_siglip_loss_matches_reference(n):
    images, texts = random_pairs(n, seed=1)
    loss = SigLipLoss()(images, texts, torch.tensor(10.0), torch.tensor(-3.0))
    assert loss.item() == pytest.approx(reference_siglip(images, texts, 10.0, -3.0), rel=1e-5)


def test_float64_features_keep_float64_precision():
    images, texts = random_pairs(9, dtype=torch.float64)
    loss = ClipLoss()(images, texts, torch.tensor(30.0, dtype=torch.float64))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(reference_clip(images, texts, 30.0), rel=1e-12)


def test_perfect_alignment_with_large_scale_costs_nothing():
    features = torch.eye(8, 16)  # orthonormal: each pair matches itself only
    assert ClipLoss()(features, features.clone(), torch.tensor(100.0)).item() < 1e-6
    assert SigLipLoss()(features, features.clone(), torch.tensor(100.0), torch.tensor(-50.0)).item() < 1e-6
    # The same pairs shuffled against each other are as wrong as can be.
    assert ClipLoss()(features, features.roll(1, dims=0), torch.tensor(100.0)).item() > 50


def test_indistinguishable_pairs_cost_log_n():
    n = 10
    same = F.normalize(torch.ones(n, 16), dim=-1)  # every logit equal: a uniform guess
    assert ClipLoss()(same, same, torch.tensor(7.0)).item() == pytest.approx(math.log(n), rel=1e-6)
    # Random directions in many dimensions are nearly orthogonal: at scale 1 still close to chance.
    g = torch.Generator().manual_seed(3)
    images = F.normalize(torch.randn(n, 2048, generator=g), dim=-1)
    texts = F.normalize(torch.randn(n, 2048, generator=g), dim=-1)
    assert ClipLoss()(images, texts, torch.tensor(1.0)).item() == pytest.approx(math.log(n), abs=0.05)
    # SigLIP at scale 0 is N independent coin flips biased by b: one positive and N-1 negatives per row.
    b = -2.0
    expected = -(math.log(torch.sigmoid(torch.tensor(b)).item()) + (n - 1) * math.log(torch.sigmoid(torch.tensor(-b)).item()))
    assert SigLipLoss()(images, texts, torch.tensor(0.0), torch.tensor(b)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_fn, bias", [(ClipLoss(), None), (SigLipLoss(), torch.tensor(-5.0))])
def test_half_precision_inputs_give_float32_loss(loss_fn, bias):
    images, texts = random_pairs(6)
    images16, texts16 = images.bfloat16(), texts.bfloat16()
    expected = loss_fn(images16.float(), texts16.float(), torch.tensor(20.0), bias)
    assert loss_fn(images16, texts16, torch.tensor(20.0), bias).dtype == torch.float32
    # Autocast would run the matmul in bf16; the loss switches it off, so the result is exact fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(images16, texts16, torch.tensor(20.0).bfloat16(), bias)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_gradients_reach_scale_bias_and_features():
    images, texts = random_pairs(7, dtype=torch.float64)
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    images.requires_grad_(True)
    SigLipLoss()(images, texts, log_scale.exp(), bias).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    # Same gradients from the float64 pairwise reference, differentiated by autograd.
    ref_log_scale = log_scale.detach().clone().requires_grad_(True)
    ref_bias = bias.detach().clone().requires_grad_(True)
    logits = ref_log_scale.exp() * images.detach() @ texts.T + ref_bias
    signs = 2 * torch.eye(7, dtype=torch.float64) - 1
    (-torch.log(torch.sigmoid(signs * logits)).sum() / 7).backward()
    assert log_scale.grad.item() == pytest.approx(ref_log_scale.grad.item(), rel=1e-9)
    assert bias.grad.item() == pytest.approx(ref_bias.grad.item(), rel=1e-9)
    assert bias.grad.item() != 0.0

    log_scale.grad = None
    ClipLoss()(images.detach(), texts, log_scale.exp()).backward()
    assert log_scale.grad is not None and log_scale.grad.item() != 0.0


@pytest.mark.parametrize("loss_fn, bias", [(ClipLoss(), None), (SigLipLoss(), torch.tensor(-2.0))])
def test_local_vs_global_rows_add_up_to_the_full_loss(loss_fn, bias):
    """Scoring micro-batches of rows against cached columns, weighted by size, rebuilds the batch loss."""
    images, texts = random_pairs(10, dtype=torch.float64)
    scale = torch.tensor(12.0, dtype=torch.float64)
    full = loss_fn(images, texts, scale, bias)
    pieces = 0.0
    for start, stop in [(0, 3), (3, 4), (4, 10)]:
        out = loss_fn.local_vs_global(images[start:stop], texts[start:stop], images, texts,
                                      scale, bias, row_offset=start)
        assert out.logits_per_image.shape == (stop - start, 10)
        assert out.labels.tolist() == list(range(start, stop))
        pieces = pieces + out.loss * (stop - start) / 10
    assert pieces.item() == pytest.approx(full.item(), rel=1e-12)


def test_return_logits_gives_what_metrics_need():
    images, texts = random_pairs(6, noise=0.1)
    out = ClipLoss()(images, texts, torch.tensor(50.0), return_logits=True)
    assert isinstance(out, LossOutput)
    assert out.logits_per_image.shape == (6, 6)
    assert torch.allclose(out.logits_per_image, 50.0 * images @ texts.T)
    assert out.labels.tolist() == list(range(6))
    # Captions this close to their images: every image ranks its own caption first...
    assert (out.logits_per_image.argmax(dim=1) == out.labels).all()
    # ...and none does once the captions are shifted by one.
    shifted = ClipLoss()(images, texts.roll(1, dims=0), torch.tensor(50.0), return_logits=True)
    assert not (shifted.logits_per_image.argmax(dim=1) == shifted.labels).any()


def test_bad_inputs_are_refused_clearly():
    images, texts = random_pairs(4)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(images, texts, torch.tensor(10.0))
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(images, texts[:3], torch.tensor(10.0))
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        build_loss("triplet")
    assert isinstance(build_loss("siglip"), SigLipLoss)


def test_gather_is_identity_without_a_process_group():
    images, _ = random_pairs(3)
    assert gather_features(images) is images
