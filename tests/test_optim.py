"""The optimiser recipe: which parameters decay, Adam settings per family, the warm-up/cosine
schedule, mixed-precision helpers and gradient clipping, on real tiny CLIPs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from clip_ray.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
from clip_ray.model import build_model
from clip_ray.model.precision import autocast_context
from clip_ray.worker.optim import (
    build_optimizer, clip_gradients, lr_at, make_grad_scaler, param_groups, set_lr, split_decay_names,
)

TEXT = TextConfig(context_length=8, vocab_size=32, width=16, layers=1, head_width=8)
TINY_VIT = ModelConfig(embed_dim=8, text=TEXT, init_logit_bias=-10.0,
                       vision=VisionConfig(image_size=16, patch_size=8, width=16, layers=1, head_width=8))
TINY_RESNET = ModelConfig(embed_dim=8, text=TEXT,
                          vision=VisionConfig(arch="resnet", image_size=32, width=8, resnet_layers=(1, 1, 1, 1),
                                              head_width=32))


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def transformer_names(prefix: str) -> tuple[set[str], set[str]]:
    """(decayed, not decayed) names of a one-block Transformer under `prefix`, written out by hand."""
    block = f"{prefix}.resblocks.0"
    decayed = {f"{block}.attn.in_proj_weight", f"{block}.attn.out_proj.weight",
               f"{block}.mlp.c_fc.weight", f"{block}.mlp.c_proj.weight"}
    not_decayed = {f"{block}.attn.in_proj_bias", f"{block}.attn.out_proj.bias",
                   f"{block}.mlp.c_fc.bias", f"{block}.mlp.c_proj.bias",
                   f"{block}.ln_1.weight", f"{block}.ln_1.bias", f"{block}.ln_2.weight", f"{block}.ln_2.bias"}
    return decayed, not_decayed


TEXT_DECAYED, TEXT_NOT_DECAYED = transformer_names("transformer")
TEXT_DECAYED = TEXT_DECAYED | {"text_projection"}
TEXT_NOT_DECAYED = TEXT_NOT_DECAYED | {"token_embedding.weight", "positional_embedding",
                                       "ln_final.weight", "ln_final.bias", "logit_scale"}


def test_vit_decays_exactly_its_matrices():
    vit_decayed, vit_not_decayed = transformer_names("visual.transformer")
    decayed, not_decayed = split_decay_names(build_model(TINY_VIT))
    assert set(decayed) == TEXT_DECAYED | vit_decayed | {"visual.conv1.weight", "visual.proj"}
    assert set(not_decayed) == TEXT_NOT_DECAYED | vit_not_decayed | {
        "logit_bias", "visual.class_embedding", "visual.positional_embedding",
        "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias"}


def test_resnet_decays_exactly_its_convolutions_and_projections():
    decayed, not_decayed = split_decay_names(build_model(TINY_RESNET))
    stages = [f"visual.layer{i}.0" for i in range(1, 5)]  # one block per stage, each with a downsample
    assert set(decayed) == TEXT_DECAYED | {
        "visual.conv1.weight", "visual.conv2.weight", "visual.conv3.weight",
        *(f"{s}.conv{j}.weight" for s in stages for j in (1, 2, 3)),
        *(f"{s}.downsample.0.weight" for s in stages),
        *(f"visual.attnpool.{p}_proj.weight" for p in "qkvc")}
    assert set(not_decayed) == TEXT_NOT_DECAYED | {
        *(f"visual.bn{j}.{p}" for j in (1, 2, 3) for p in ("weight", "bias")),
        *(f"{s}.bn{j}.{p}" for s in stages for j in (1, 2, 3) for p in ("weight", "bias")),
        *(f"{s}.downsample.1.{p}" for s in stages for p in ("weight", "bias")),
        *(f"visual.attnpool.{p}_proj.bias" for p in "qkvc"),
        "visual.attnpool.positional_embedding"}


def test_frozen_parameters_are_left_out():
    model = build_model(TINY_VIT)
    model.visual.requires_grad_(False)
    decayed, not_decayed = split_decay_names(model)
    assert not any(name.startswith("visual.") for name in decayed + not_decayed)


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_an_adamw_step_without_gradient_decays_only_the_decay_group(config):
    """With zero gradients Adam's update is 0, so what moves is decoupled decay alone: p * (1 - lr * wd)."""
    model = build_model(config)
    train = TrainConfig(lr=0.1, weight_decay=0.5, warmup_steps=0)
    optimizer = build_optimizer(model, train, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    set_lr(optimizer, 0.1)
    optimizer.step()
    decayed, not_decayed = split_decay_names(model)
    params = dict(model.named_parameters())
    for name in decayed:
        torch.testing.assert_close(params[name], before[name] * (1 - 0.1 * 0.5))
    for name in not_decayed:
        assert torch.equal(params[name], before[name]), name
    # Every parameter is in exactly one group.
    grouped = [id(p) for group in param_groups(model, 0.5) for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())


def test_adam_settings_follow_the_family_unless_configured():
    train = TrainConfig()
    vit = build_optimizer(build_model(TINY_VIT), train, TINY_VIT).param_groups[0]
    resnet = build_optimizer(build_model(TINY_RESNET), train, TINY_RESNET).param_groups[0]
    assert (vit["betas"], vit["eps"]) == ((0.9, 0.98), 1e-6)
    assert (resnet["betas"], resnet["eps"]) == ((0.9, 0.999), 1e-8)
    configured = dataclasses.replace(train, betas=(0.8, 0.95), eps=1e-5)
    group = build_optimizer(build_model(TINY_RESNET), configured, TINY_RESNET).param_groups[0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.95), 1e-5)
    assert group["weight_decay"] == train.weight_decay
    assert not group["fused"]  # the fused kernel is for CUDA parameters


def test_warmup_then_cosine_at_key_steps():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    floor = 1e-4
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 10)
    assert lr_at(4, cfg) == pytest.approx(1e-3 * 5 / 10)
    assert lr_at(9, cfg) == pytest.approx(1e-3)          # the last warm-up step reaches the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)         # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx((1e-3 + floor) / 2)  # half way through the decay
    assert lr_at(35, cfg) == pytest.approx(floor + (1e-3 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(floor)
    assert lr_at(500, cfg) == pytest.approx(floor)       # held after the end
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_constant_schedule_and_no_warmup():
    constant = TrainConfig(lr=2e-3, warmup_steps=4, steps=100, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 3, 4, 50, 100)] == pytest.approx([5e-4, 2e-3, 2e-3, 2e-3, 2e-3])
    no_warmup = TrainConfig(lr=2e-3, warmup_steps=0, steps=100)
    assert lr_at(0, no_warmup) == pytest.approx(2e-3)
    assert lr_at(100, no_warmup) == pytest.approx(0.0)


def test_set_lr_reaches_every_group():
    model = build_model(TINY_VIT)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3, warmup_steps=10), TINY_VIT)
    assert all(g["lr"] == pytest.approx(1e-4) for g in optimizer.param_groups)  # lr_at(0)
    set_lr(optimizer, 0.5)
    assert all(g["lr"] == 0.5 for g in optimizer.param_groups)


def test_grad_scaler_only_for_fp16():
    assert make_grad_scaler("fp16", "cpu").is_enabled()
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("fp32", "cpu").is_enabled()


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_autocast_context_computes_in_the_precision(precision, dtype):
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context(precision, "cpu"):
        assert (a @ b).dtype == dtype
    with pytest.raises(ValueError, match="fp8"):
        autocast_context("fp8", "cpu")


def grads_of_norm(params: list[torch.nn.Parameter], norm: float) -> None:
    """Gives `params` gradients whose global L2 norm is `norm`."""
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    total = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
    for p in params:
        p.grad *= norm / total


def global_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.square().sum()) for p in params))


def test_clipping_returns_the_norm_and_bounds_it():
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    grads_of_norm(params, 10.0)
    norm = clip_gradients(params, max_norm=2.0)
    assert float(norm) == pytest.approx(10.0, rel=1e-5)
    assert global_norm(params) == pytest.approx(2.0, rel=1e-4)
    # Below the threshold, or without one, gradients are untouched but the norm is still reported.
    grads_of_norm(params, 1.5)
    before = [p.grad.clone() for p in params]
    assert float(clip_gradients(params, max_norm=2.0)) == pytest.approx(1.5, rel=1e-5)
    assert float(clip_gradients(params, max_norm=None)) == pytest.approx(1.5, rel=1e-5)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))


def test_clipping_unscales_fp16_gradients_first():
    params = [torch.nn.Parameter(torch.ones(4))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scaler = make_grad_scaler("fp16", "cpu")
    loss = (params[0] * torch.tensor([3.0, 0.0, 4.0, 0.0])).sum()  # gradient norm 5
    scaler.scale(loss).backward()
    assert global_norm(params) == pytest.approx(5.0 * scaler.get_scale())
    norm = clip_gradients(params, max_norm=1.0, optimizer=optimizer, scaler=scaler)
    assert float(norm) == pytest.approx(5.0)
    assert global_norm(params) == pytest.approx(1.0, rel=1e-4)
    scaler.step(optimizer)  # knows the gradients are unscaled already; unscaling twice would raise
    scaler.update()
    with pytest.raises(ValueError, match="optimizer"):
        clip_gradients(params, 1.0, scaler=scaler)
