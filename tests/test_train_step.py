"""The optimiser step: accumulation keeps the full batch's negatives, and non-finite losses are skipped."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist

from clip_ray.config import TrainConfig
from clip_ray.loss import build_loss
from clip_ray.model import build_model
from clip_ray.worker.optim import build_optimizer, make_grad_scaler
from clip_ray.worker.step import NonFiniteLossError, TrainStep
from step_helpers import TINY_RESNET, TINY_VIT, random_batch, run_on_two_ranks

def _one_step(model, config, train_cfg, images, texts, wrap=lambda m: m):
    """One TrainStep; the gradients it used and the parameters after it.

    Compare parameters only with a large Adam eps: with the default, gradients that
    are zero up to rounding (a key bias) turn into full +-lr steps of random sign.
    """
    optimizer = build_optimizer(model, train_cfg, config)
    step = TrainStep(wrap(model), optimizer, build_loss(train_cfg.loss), make_grad_scaler("fp32", "cpu"),
                     train_cfg, torch.device("cpu"))
    result = step(images, texts)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return result, grads, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_rows", [None, 5, 1], ids=["loss-whole", "loss-chunks-of-5", "loss-chunks-of-1"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_accumulation_equals_one_step_on_the_wholerandom_batch(loss, chunk_rows):
    """Also with the accumulated loss computed a chunk of rows at a time (5 leaves a short last chunk)."""
    config = copy.deepcopy(TINY_VIT)
    config.init_logit_bias = -10.0 if loss == "siglip" else None
    torch.manual_seed(0)
    model = build_model(config)
    images, texts = random_batch(12, config)
    whole = TrainConfig(loss=loss, precision="fp32", lr=1e-3, eps=1.0, warmup_steps=0, accumulation_steps=1)
    accumulated = TrainConfig(loss=loss, precision="fp32", lr=1e-3, eps=1.0, warmup_steps=0, accumulation_steps=3,
                              loss_chunk_rows=chunk_rows)
    r1, g1, p1 = _one_step(copy.deepcopy(model), config, whole, images, texts)
    r3, g3, p3 = _one_step(copy.deepcopy(model), config, accumulated, images, texts)
    assert r1.loss == pytest.approx(r3.loss, rel=1e-6)
    assert g1.keys() == g3.keys() and "logit_scale" in g1
    for name in g1:
        torch.testing.assert_close(g3[name], g1[name], rtol=1e-4, atol=1e-5, msg=name)
    for name in p1:
        torch.testing.assert_close(p3[name], p1[name], rtol=1e-4, atol=1e-5, msg=name)
    # Control: scoring each micro-batch only against itself would give another gradient.
    with torch.no_grad():
        small = build_loss(loss)(*copy.deepcopy(model)(images[:4], texts[:4]))
    assert abs(float(small) - r1.loss) > 1e-3


def test_accumulation_replays_patch_dropout_and_counts_batch_norm_once():
    config = copy.deepcopy(TINY_RESNET)
    torch.manual_seed(0)
    model = build_model(config)
    images, texts = random_batch(8, config)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # the two micro-batches, each through the BatchNorms once
        reference(images[:4], texts[:4])
        reference(images[4:], texts[4:])
    _one_step(model, config, TrainConfig(precision="fp32", accumulation_steps=2, warmup_steps=0), images, texts)
    for (name, mine), (_, ref) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(mine, ref, msg=name)

    vit = copy.deepcopy(TINY_VIT)
    vit.vision.patch_dropout = 0.5
    torch.manual_seed(1)
    model = build_model(vit)
    images, texts = random_batch(8, vit)
    # Reference: the whole batch in one pass from the same random state, which draws the same patches.
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    build_loss("clip")(*reference(images, texts)).backward()
    torch.manual_seed(5)
    _, grads, _ = _one_step(model, vit, TrainConfig(precision="fp32", accumulation_steps=2, warmup_steps=0),
                            images, texts)
    # Re-encoding keeps the very patches of the cached pass; were they drawn again, these would differ.
    for name, param in reference.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_non_finite_losses_are_skipped_then_stop_the_run():
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    cfg = TrainConfig(precision="fp32", max_consecutive_nonfinite=3, warmup_steps=0)
    step = TrainStep(model, build_optimizer(model, cfg, TINY_VIT), build_loss("clip"), make_grad_scaler("fp32", "cpu"),
                     cfg, torch.device("cpu"))
    images, texts = random_batch(4, TINY_VIT)
    poisoned = images.clone()
    poisoned[0, 0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert step(poisoned, texts).skipped
    assert step(poisoned, texts).skipped
    for name, param in model.named_parameters():  # skipped steps leave the weights alone
        assert torch.equal(param, before[name]), name
    assert not step(images, texts).skipped  # a good step resets the run of bad ones
    assert step.consecutive_nonfinite == 0 and step.total_nonfinite == 2
    step(poisoned, texts)
    step(poisoned, texts)
    with pytest.raises(NonFiniteLossError, match="3 optimiser steps in a row"):
        step(poisoned, texts)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_model(TINY_VIT)
        images, texts = random_batch(16, TINY_VIT)
        local = slice(rank * 8, rank * 8 + 8)
        cfg = TrainConfig(precision="fp32", accumulation_steps=4, warmup_steps=0, lr=1e-3, eps=1.0)
        _, grads, params = _one_step(model, TINY_VIT, cfg, images[local], texts[local],
                                     wrap=torch.nn.parallel.DistributedDataParallel)
        torch.save({"grads": grads, "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_accumulation_under_ddp_matches_one_process_on_the_globalrandom_batch():
    results = run_on_two_ranks(_ddp_worker)
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    images, texts = random_batch(16, TINY_VIT)
    _, grads, params = _one_step(model, TINY_VIT, TrainConfig(precision="fp32", warmup_steps=0, lr=1e-3, eps=1.0),
                                 images, texts)
    for result in results:
        for name in grads:
            torch.testing.assert_close(result["grads"][name], grads[name], rtol=1e-4, atol=1e-5, msg=name)
        for name in params:
            torch.testing.assert_close(result["params"][name], params[name], rtol=1e-4, atol=1e-5, msg=name)


# --------------------------------------------------------------------------- compile, chunked loss, guards


@pytest.mark.slow
def test_compiled_accumulation_with_patch_dropout_equals_the_eager_whole_batch_step():
    """Both passes of the accumulated step run the compiled model and keep the same patches, so its
    gradients are those of one eager step on the whole batch (Inductor draws random numbers its own way)."""
    vit = copy.deepcopy(TINY_VIT)
    vit.vision.patch_dropout = 0.5
    torch.manual_seed(1)
    model = build_model(vit)
    images, texts = random_batch(8, vit)
    torch.manual_seed(5)
    _, eager, _ = _one_step(copy.deepcopy(model), vit, TrainConfig(precision="fp32", warmup_steps=0), images, texts)
    torch.manual_seed(5)
    _, compiled, _ = _one_step(copy.deepcopy(model), vit, TrainConfig(precision="fp32", accumulation_steps=2,
                                                                      warmup_steps=0),
                               images, texts, wrap=torch.compile)
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5, msg=name)


def _guard_and_chunk_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        # 1. A finite loss with an infinite gradient on rank 1 only: both ranks skip, nothing changes.
        torch.manual_seed(0)
        model = build_model(TINY_VIT)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        cfg = TrainConfig(precision="fp32", warmup_steps=0, lr=1e-3)
        optimizer = build_optimizer(model, cfg, TINY_VIT)
        step = TrainStep(torch.nn.parallel.DistributedDataParallel(model), optimizer, build_loss("clip"),
                         make_grad_scaler("fp32", "cpu"), cfg, torch.device("cpu"))
        images, texts = random_batch(8, TINY_VIT)
        local = slice(rank * 4, rank * 4 + 4)
        hook = model.visual.proj.register_hook(lambda grad: grad * float("inf")) if rank == 1 else None
        bad = step(images[local], texts[local])
        results["bad"] = {"skipped": bad.skipped, "total": step.total_nonfinite,
                          "unchanged": all(torch.equal(p, before[n]) for n, p in model.named_parameters()),
                          "optimizer_state": len(optimizer.state)}
        if hook is not None:
            hook.remove()
        good = step(images[local], texts[local])
        results["good"] = {"skipped": good.skipped, "loss": good.loss}

        # 2. The loss a chunk of rows at a time: the gradients of the whole local block, gathered columns included.
        g = torch.Generator().manual_seed(7)
        features = [torch.nn.functional.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=-1)
                    for _ in range(2)]
        for kind in ("clip", "siglip"):
            grads = {}
            for mode in ("whole", "chunks"):
                rows = [f[local].clone().requires_grad_() for f in features]
                scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
                bias = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
                loss_fn = build_loss(kind)
                if mode == "whole":
                    loss = loss_fn(*rows, scale, bias)
                    loss.backward()
                else:
                    loss = loss_fn.backward_in_chunks(*rows, scale, bias, chunk_rows=3)
                grads[mode] = {"loss": loss.item(), "rows": [r.grad for r in rows], "scale": scale.grad,
                               "bias": bias.grad}
            results[kind] = grads
        # 3. The ranks' shapes were compared on the loss's first call; a later change is caught here,
        #    on this rank alone, without a collective (rank 1 does not call: a collective would hang).
        if rank == 0:
            try:
                loss_fn(features[0][:3], features[1][:3], scale, bias)
                results["changed_shape"] = None
            except ValueError as err:
                results["changed_shape"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_infinite_gradient_on_one_rank_skips_the_step_everywhere_and_chunks_match():
    results = run_on_two_ranks(_guard_and_chunk_worker)
    for rank, result in enumerate(results):
        assert result["bad"] == {"skipped": True, "total": 1, "unchanged": True, "optimizer_state": 0}, rank
        assert not result["good"]["skipped"] and math.isfinite(result["good"]["loss"]), rank
        for kind in ("clip", "siglip"):
            whole, chunks = result[kind]["whole"], result[kind]["chunks"]
            assert chunks["loss"] == pytest.approx(whole["loss"], rel=1e-12), (rank, kind)
            for a, b in zip(chunks["rows"], whole["rows"]):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(chunks["scale"], whole["scale"], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(chunks["bias"], whole["bias"], rtol=1e-10, atol=1e-12)
    assert "changed shape from (4, 16) to (3, 16) on rank 0" in results[0]["changed_shape"]
