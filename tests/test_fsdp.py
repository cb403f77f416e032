"""train.strategy fsdp: on two gloo ranks one FSDP step equals one DDP step (loss, gradient norm,
updated weights), and an FSDP checkpoint resumes under DDP, under FSDP and on one process with the
same next step."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clip_ray.config import ConfigError, TrainConfig
from clip_ray.loss import build_loss
from clip_ray.model import build_model
from clip_ray.worker.checkpoint import load_training_state, restore_training_state, save_training_state
from clip_ray.worker.optim import build_optimizer, make_grad_scaler
from clip_ray.worker.sharding import full_state_dicts, wrap_for_training
from clip_ray.worker.step import TrainStep
from step_helpers import TINY_RESNET, TINY_VIT, random_batch, run_on_two_ranks

CPU = torch.device("cpu")
# eps=1: Adam's update is then proportional to the gradient, so float noise in a near-zero gradient
# stays noise instead of becoming a full step of random sign.
FP32 = dict(precision="fp32", warmup_steps=0, lr=1e-3, eps=1.0)


def _two_block_vit():
    config = copy.deepcopy(TINY_VIT)
    config.vision.layers = config.text.layers = 2
    return config


def _cases() -> dict:
    """name -> (model config, train config): the step's paths FSDP must match DDP on."""
    siglip_checkpointed = _two_block_vit()
    siglip_checkpointed.init_logit_bias = -10.0  # a second 0-dim parameter
    siglip_checkpointed.grad_checkpointing = True
    return {
        "vit-whole-batch": (_two_block_vit(), TrainConfig(**FP32)),
        "vit-accumulated-checkpointed-clipped": (
            siglip_checkpointed, TrainConfig(loss="siglip", accumulation_steps=2, grad_clip_norm=0.5, **FP32)),
        "resnet-accumulated": (TINY_RESNET, TrainConfig(accumulation_steps=2, **FP32)),
    }


def _trainer(model_config, train_config, strategy: str):
    """(model, optimizer, TrainStep) wrapped for `strategy`, from seed 0."""
    torch.manual_seed(0)
    model = build_model(model_config)
    train_model = wrap_for_training(model, strategy, CPU, train_config.precision)
    optimizer = build_optimizer(model, train_config, model_config)
    step = TrainStep(train_model, optimizer, build_loss(train_config.loss), make_grad_scaler("fp32", "cpu"),
                     train_config, CPU)
    return model, optimizer, step


def _fsdp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name, (model_config, train_config) in _cases().items():
            images, texts = random_batch(16, model_config)
            local = slice(rank * 8, rank * 8 + 8)
            for strategy in ("ddp", "fsdp"):
                model, optimizer, step = _trainer(model_config, train_config, strategy)
                result = step(images[local], texts[local])
                weights, _ = full_state_dicts(model, optimizer)
                results[f"{name}/{strategy}"] = {"loss": result.loss, "grad_norm": result.grad_norm,
                                                 "weights": weights if rank == 0 else {}}

        # A checkpoint after one FSDP step; the second step continued, and resumed under DDP and FSDP.
        model_config, train_config = _cases()["vit-whole-batch"]
        first, second = random_batch(16, model_config, seed=1), random_batch(16, model_config, seed=2)
        local = slice(rank * 8, rank * 8 + 8)
        model, optimizer, step = _trainer(model_config, train_config, "fsdp")
        step(first[0][local], first[1][local])
        state_dicts = full_state_dicts(model, optimizer)
        if rank == 0:
            save_training_state(Path(out_dir) / "ckpt", model=model, optimizer=optimizer, step=1,
                                state_dicts=state_dicts)
        dist.barrier()
        for label, strategy in (("continued", None), ("resumed-ddp", "ddp"), ("resumed-fsdp", "fsdp")):
            if strategy is not None:
                model, optimizer, step = _trainer(model_config, train_config, strategy)
                restore_training_state(load_training_state(Path(out_dir) / "ckpt"), model, optimizer)
            result = step(second[0][local], second[1][local])
            weights, _ = full_state_dicts(model, optimizer)
            results[label] = {"loss": result.loss, "weights": weights if rank == 0 else {}}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_same_weights(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{what}: {key}")


@pytest.mark.slow
def test_fsdp_step_equals_ddp_and_its_checkpoint_resumes_under_any_strategy_and_world_size(tmp_path):
    ranks = run_on_two_ranks(_fsdp_worker, str(tmp_path))
    for name in _cases():
        for rank in ranks:
            ddp, fsdp = rank[f"{name}/ddp"], rank[f"{name}/fsdp"]
            assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=1e-5), name
            assert fsdp["grad_norm"] == pytest.approx(ddp["grad_norm"], rel=1e-5), name
        ddp, fsdp = ranks[0][f"{name}/ddp"]["weights"], ranks[0][f"{name}/fsdp"]["weights"]
        assert not torch.equal(fsdp["logit_scale"], build_model(_cases()[name][0]).logit_scale.detach())
        _assert_same_weights(fsdp, ddp, name)

    # The same second step, wherever it resumed: loss (averaged over the ranks' rows) and weights.
    continued = ranks[0]["continued"]
    mean_loss = sum(rank["continued"]["loss"] for rank in ranks) / 2
    for label in ("resumed-ddp", "resumed-fsdp"):
        assert [rank[label]["loss"] for rank in ranks] == pytest.approx([r["continued"]["loss"] for r in ranks],
                                                                         rel=1e-6), label
        _assert_same_weights(ranks[0][label]["weights"], continued["weights"], label)

    # One process, the whole batch of 16.
    model_config, train_config = _cases()["vit-whole-batch"]
    model, optimizer, step = _trainer(model_config, train_config, "ddp")
    restore_training_state(load_training_state(tmp_path / "ckpt"), model, optimizer)
    result = step(*random_batch(16, model_config, seed=2))
    assert result.loss == pytest.approx(mean_loss, rel=1e-5)
    _assert_same_weights(model.state_dict(), continued["weights"], "one process")


def test_fsdp_refuses_fp16_by_name():
    with pytest.raises(ConfigError, match="train.precision='fp16'.*strategy 'fsdp'"):
        TrainConfig(strategy="fsdp", precision="fp16").validate()
