"""Locked towers (model.lock_image / lock_text, LiT): one real training step leaves every locked tensor
bit-identical (parameters and BatchNorm statistics) while the rest moves, the optimiser and DDP's gradient
all-reduce carry only trainable parameters, and checkpoints resume exactly, also under changed locks."""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from clip_ray.config import ConfigError, ModelConfig, TrainConfig, load_config
from clip_ray.config.presets import get_preset
from clip_ray.loss import build_loss
from clip_ray.model import build_model
from clip_ray.driver.init_weights import prepare_initial_weights
from clip_ray.model.initial_weights import fit_initial_weights, load_initial_weights, read_prepared_weights
from clip_ray.model.locking import FrozenStatsBatchNorm2d, lock_towers
from clip_ray.worker.checkpoint import (
    export_openai_state_dict, load_training_state, restore_training_state, save_training_state,
)
from clip_ray.worker.optim import build_optimizer, make_grad_scaler, split_decay_names
from clip_ray.worker.sharding import full_state_dicts, wrap_for_training
from clip_ray.worker.step import TrainStep
from repo_paths import REPO_ROOT
from step_helpers import random_batch, run_on_two_ranks

CPU = torch.device("cpu")
TRAIN = TrainConfig(precision="fp32", warmup_steps=0, lr=1e-3)
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@pytest.fixture(autouse=True)
def _one_thread(one_intra_op_thread):
    """Toy models on a shared 2-core machine (conftest)."""


def _config(preset: str, **locks) -> ModelConfig:
    config = get_preset(preset)
    for name, value in locks.items():
        setattr(config, name, value)
    config.validate()
    return config


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, by state-dict key."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _locked_model(config: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config).train()
    if config.vision.arch == "resnet":
        # A fresh ResNet's residual branches end in a zero gain (bn3), which leaves their other norms without a
        # gradient; a pretrained tower, what one locks, has none of that.
        with torch.no_grad():
            for block in model.visual.blocks():
                block.bn3.weight.fill_(1.0)
    lock_towers(model, config)
    return model


def _trainer(model, config: ModelConfig, train: TrainConfig = TRAIN, wrapped=None) -> TrainStep:
    optimizer = build_optimizer(model, train, config)
    return TrainStep(wrapped or model, optimizer, build_loss(train.loss), make_grad_scaler("fp32", "cpu"), train, CPU)


def _moved_by_one_step(config: ModelConfig, train: TrainConfig = TRAIN) -> tuple[set[str], set[str]]:
    """(the state-dict keys one real training step changed, all keys)."""
    model = _locked_model(config).train()  # as the loop does, after every evaluation
    before = _tensors(model)
    result = _trainer(model, config, train)(*random_batch(8, config))
    assert not result.skipped
    after = _tensors(model)
    return {key for key in before if not torch.equal(before[key], after[key])}, set(before)


def _is_batch_norm_stat(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _image(key: str) -> bool:
    return key.startswith("visual.")


def _text(key: str) -> bool:
    return key.startswith(TEXT_PREFIXES)


# case -> (preset, locks, which keys must stay bit-identical)
CASES = {
    "vit-image-locked": ("vit-tiny", dict(lock_image=True), _image),
    "vit-image-last-block": (
        "vit-tiny", dict(lock_image=True, lock_image_unlocked_blocks=1),
        lambda k: _image(k) and not k.startswith(("visual.transformer.resblocks.3.", "visual.ln_post.", "visual.proj"))),
    "vit-text-locked": ("vit-tiny", dict(lock_text=True), _text),
    "vit-text-last-block": (
        "vit-tiny", dict(lock_text=True, lock_text_unlocked_blocks=1),
        lambda k: _text(k) and not k.startswith(("transformer.resblocks.3.", "ln_final.", "text_projection"))),
    "resnet-image-locked": ("rn-tiny", dict(lock_image=True), _image),
    "resnet-image-last-stage": (
        "rn-tiny", dict(lock_image=True, lock_image_unlocked_blocks=1),
        lambda k: _image(k) and not k.startswith(("visual.layer4.", "visual.attnpool."))),
    # Control: with live statistics the locked ResNet's BatchNorms do count the batch.
    "resnet-image-locked-live-bn-stats": (
        "rn-tiny", dict(lock_image=True, lock_image_freeze_bn_stats=False),
        lambda k: _image(k) and not _is_batch_norm_stat(k)),
}


@pytest.mark.parametrize("case", CASES)
def test_one_step_leaves_exactly_the_locked_tensors_bit_identical(case):
    preset, locks, stays = CASES[case]
    moved, keys = _moved_by_one_step(_config(preset, **locks))
    expected = {key for key in keys if not stays(key)}
    assert moved == expected, (f"moved but locked: {sorted(moved - expected)[:5]}; "
                               f"trainable but unmoved: {sorted(expected - moved)[:5]}")
    assert "logit_scale" in moved, "the temperature belongs to neither tower and trains"


@pytest.mark.parametrize("case", ["vit-image-locked", "resnet-image-last-stage"])
def test_an_accumulated_step_keeps_the_same_tensors_locked(case):
    """GradCache's three passes (and its BatchNorm roll-back) over a locked tower."""
    preset, locks, stays = CASES[case]
    accumulated = TrainConfig(precision="fp32", warmup_steps=0, lr=1e-3, accumulation_steps=2)
    moved, keys = _moved_by_one_step(_config(preset, **locks), accumulated)
    assert moved == {key for key in keys if not stays(key)}


def test_an_unlocked_model_moves_everything():
    """Control for the cases above: without locks the same step changes every tensor, BatchNorm statistics too."""
    moved, keys = _moved_by_one_step(_config("rn-tiny"))
    assert moved == keys


@pytest.mark.parametrize("case", ["vit-image-last-block", "vit-text-locked", "resnet-image-locked"])
def test_the_optimiser_holds_only_trainable_parameters(case):
    preset, locks, _ = CASES[case]
    config = _config(preset, **locks)
    model = _locked_model(config)
    optimizer = build_optimizer(model, TRAIN, config)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    locked = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert locked, "the case locks something"
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in held for name, p in model.named_parameters() if name in locked)
    decayed, not_decayed = split_decay_names(model)
    assert not set(locked) & (set(decayed) | set(not_decayed))


def test_frozen_batch_norms_stay_in_eval_mode_and_keep_the_state_dict_layout():
    config = _config("rn-tiny", lock_image=True, lock_image_unlocked_blocks=1)
    fresh = build_model(config)
    model = _locked_model(config)
    summary = lock_towers(model, config)  # twice: idempotent
    assert list(model.state_dict()) == list(fresh.state_dict()), "OpenAI's keys, in order"
    norms = {name: m for name, m in model.visual.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    frozen = {name for name, m in norms.items() if isinstance(m, FrozenStatsBatchNorm2d)}
    assert frozen == {name for name in norms if not name.startswith("layer4.")} and frozen
    assert summary.image.frozen_batch_norms == len(frozen)
    for copy_of in (model, copy.deepcopy(model)):
        copy_of.train()  # what the loop and the evaluator call
        assert all(not norms_m.training for name, norms_m in copy_of.visual.named_modules() if name in frozen)
        assert copy_of.visual.layer4[0].bn1.training
    fresh.load_state_dict(model.state_dict(), strict=True)
    # In train mode a frozen stage normalises with its running statistics, as at inference.
    images = random_batch(4, config)[0]
    with torch.no_grad():
        assert torch.equal(model.visual.stem(images), fresh.eval().visual.stem(images))


def test_the_summary_counts_each_tower():
    config = _config("vit-tiny", lock_image=True, lock_text=True, lock_text_unlocked_blocks=2)
    model = build_model(config)
    summary = lock_towers(model, config)
    image = sum(p.numel() for name, p in model.named_parameters() if name.startswith("visual."))
    assert summary.image.locked_params == image and summary.image.trainable_params == 0
    assert summary.text.trainable_params == sum(p.numel() for name, p in model.named_parameters()
                                                if name.startswith(("transformer.resblocks.2.", "transformer.resblocks.3.",
                                                                    "ln_final.", "text_projection")))
    assert summary.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.as_dict()["image_locked_params"] == image
    assert "image tower locked" in str(summary) and "the last 2 of 4 blocks" in str(summary)
    assert str(lock_towers(build_model(get_preset("vit-tiny")), get_preset("vit-tiny"))).startswith(
        "image tower trainable")


@pytest.mark.parametrize("preset, field, value, blocks", [
    ("vit-tiny", "lock_image_unlocked_blocks", 5, 4), ("rn-tiny", "lock_image_unlocked_blocks", 5, 4),
    ("vit-tiny", "lock_text_unlocked_blocks", 5, 4)])
def test_more_unlocked_blocks_than_the_tower_has_is_a_config_error(preset, field, value, blocks):
    config = get_preset(preset)
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=rf"model\.{field}={value}: exceeds the \w+ tower's {blocks} blocks"):
        config.validate()
    setattr(config, field, blocks)
    config.validate()


def test_a_locked_run_resumes_exactly_and_under_changed_locks(tmp_path, caplog):
    config = _config("vit-tiny", lock_image=True)
    first, second = random_batch(8, config, seed=1), random_batch(8, config, seed=2)
    model = _locked_model(config)
    step = _trainer(model, config)
    step(*first)
    save_training_state(tmp_path / "ckpt", model=model, optimizer=step.optimizer, step=1)
    step(*second)
    continued = _tensors(model)

    resumed = _locked_model(config)
    resumed_step = _trainer(resumed, config)
    restore_training_state(load_training_state(tmp_path / "ckpt"), resumed, resumed_step.optimizer)
    resumed_step(*second)
    assert all(torch.equal(value, continued[key]) for key, value in _tensors(resumed).items())

    # Unlocking the last block on resume: the weights come back whole, the block's Adam state starts fresh.
    unlocked = _config("vit-tiny", lock_image=True, lock_image_unlocked_blocks=1)
    model = _locked_model(unlocked)
    step = _trainer(model, unlocked)
    with caplog.at_level(logging.WARNING, logger="clip_ray.worker.sharding"):
        restore_training_state(load_training_state(tmp_path / "ckpt"), model, step.optimizer)
    assert "other tower locks" in caplog.text and "visual.ln_post.bias" in caplog.text
    state = step.optimizer.state
    assert {id(p) for p in state} == {id(p) for name, p in model.named_parameters() if not name.startswith("visual.")}
    assert [g["name"] for g in step.optimizer.param_groups] == ["decay", "no_decay"]
    before = _tensors(model)
    assert not step(*second).skipped
    assert not torch.equal(before["visual.proj"], model.visual.proj.detach())

    # Locking a tower on resume drops its Adam state; the locked tower then stays as it was saved.
    free = _config("vit-tiny")
    model = _locked_model(free)
    step = _trainer(model, free)
    step(*first)
    save_training_state(tmp_path / "free", model=model, optimizer=step.optimizer, step=1)
    model = _locked_model(config)
    step = _trainer(model, config)
    restore_training_state(load_training_state(tmp_path / "free"), model, step.optimizer)
    saved = _tensors(model)
    step(*second)
    assert all(torch.equal(value, saved[key]) for key, value in _tensors(model).items() if key.startswith("visual."))


def test_the_lit_preset_trains_a_fresh_text_tower_against_a_locked_pretrained_image_tower(tmp_path):
    """configs/flickr8k-lit-cpu.yaml, with a random vit-tiny's weights as the pretrained source: the driver's
    preparation and the worker's init + lock (worker/loop.py start_run), then one real step."""
    torch.manual_seed(123)
    source = build_model(get_preset("vit-tiny"))
    source_file = export_openai_state_dict(source, tmp_path / "pretrained.pt")
    config = load_config(REPO_ROOT / "configs" / "flickr8k-lit-cpu.yaml",
                         [f"model.init_from={source_file}", f"cluster.storage_path={tmp_path}"])
    assert config.model.init_from_towers == "image" and config.model.lock_image and not config.model.lock_text
    prepare_initial_weights(config)
    torch.manual_seed(0)  # a text tower unlike the source's
    model = build_model(config.model).train()
    fitted = fit_initial_weights(read_prepared_weights(config.model.init_from), config.model, "image")[0]
    load_initial_weights(model, fitted, "image")
    summary = lock_towers(model, config.model)
    assert summary.image.trainable_params == 0 and summary.text.locked_params == 0
    pretrained = source.state_dict()
    before = _tensors(model)
    assert all(torch.equal(before[key], pretrained[key]) for key in before if key.startswith("visual."))
    assert not torch.equal(before["token_embedding.weight"], pretrained["token_embedding.weight"]), "fresh text"
    _trainer(model, config.model, config.train)(*random_batch(8, config.model))
    after = _tensors(model)
    assert all(torch.equal(after[key], pretrained[key]) for key in after if key.startswith("visual."))
    assert not torch.equal(after["text_projection"], before["text_projection"])


# --------------------------------------------------------------------------- two ranks


def _recording_allreduce(record, bucket):
    """DDP's own all-reduce, after noting which parameters the bucket carries and its size. (No annotations:
    DDP checks them against its own, which postponed evaluation turns into strings.)"""
    record.append((bucket.buffer().numel(), [id(p) for p in bucket.parameters()]))
    return default_hooks.allreduce_hook(None, bucket)


def _two_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        config = _config("vit-tiny", lock_image=True)
        images, texts = random_batch(16, config)
        local = slice(rank * 8, rank * 8 + 8)
        results = {}
        for strategy in ("ddp", "fsdp"):
            model = _locked_model(config)
            before = _tensors(model)
            names = {id(p): name for name, p in model.named_parameters()}
            train_model = wrap_for_training(model, strategy, CPU)
            record = []
            if strategy == "ddp":
                train_model.register_comm_hook(record, _recording_allreduce)
            step = _trainer(model, config, wrapped=train_model)
            assert not step(images[local], texts[local]).skipped
            weights, _ = full_state_dicts(model, step.optimizer)
            results[strategy] = {
                "before": before, "after": weights,
                "reduced_numel": sum(numel for numel, _ in record),
                "reduced_names": sorted(names[i] for _, ids in record for i in ids),
                "frozen_with_grad": [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None],
            }
        # FSDP resuming that checkpoint with the last image block unlocked: its Adam state starts fresh.
        state_dicts = full_state_dicts(model, step.optimizer)
        if rank == 0:
            save_training_state(os.path.join(out_dir, "ckpt"), model=model, optimizer=step.optimizer, step=1,
                                state_dicts=state_dicts)
        dist.barrier()
        unlocked = _config("vit-tiny", lock_image=True, lock_image_unlocked_blocks=1)
        model = _locked_model(unlocked)
        step = _trainer(model, unlocked, wrapped=wrap_for_training(model, "fsdp", CPU))
        restore_training_state(load_training_state(os.path.join(out_dir, "ckpt")), model, step.optimizer)
        names = {id(p): name for name, p in model.named_parameters()}
        results["fsdp-unlocked-on-resume"] = {"with_state": sorted(names[id(p)] for p in step.optimizer.state),
                                              "skipped": step(images[local], texts[local]).skipped,
                                              "after": full_state_dicts(model, step.optimizer)[0]}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_only_trainable_gradients_and_keep_the_locked_tower(tmp_path):
    ranks = run_on_two_ranks(_two_rank_worker, str(tmp_path))
    model = build_model(_config("vit-tiny"))
    trainable = sorted(name for name, _ in model.named_parameters() if not name.startswith("visual."))
    trainable_numel = sum(p.numel() for name, p in model.named_parameters() if name in trainable)
    for rank in ranks:
        ddp = rank["ddp"]
        assert ddp["reduced_names"] == trainable, "DDP's buckets hold the trainable parameters, each once"
        assert ddp["reduced_numel"] == trainable_numel
        for strategy in ("ddp", "fsdp"):
            assert rank[strategy]["frozen_with_grad"] == []
    for strategy in ("ddp", "fsdp"):
        before, after = ranks[0][strategy]["before"], ranks[0][strategy]["after"]
        assert after.keys() == before.keys()
        for key in before:
            assert torch.equal(after[key], before[key]) == key.startswith("visual."), f"{strategy}: {key}"
    ddp_ranks = [rank["ddp"]["after"] for rank in ranks]
    assert all(torch.equal(ddp_ranks[0][key], ddp_ranks[1][key]) for key in ddp_ranks[0]), "ranks agree"
    for key, value in ranks[0]["fsdp"]["after"].items():
        torch.testing.assert_close(value, ddp_ranks[0][key], rtol=1e-4, atol=1e-6, msg=f"FSDP vs DDP: {key}")
    resumed = [rank["fsdp-unlocked-on-resume"] for rank in ranks]
    assert all(r["with_state"] == trainable and not r["skipped"] for r in resumed)
    saved, after = ranks[0]["fsdp"]["after"], resumed[0]["after"]
    assert not torch.equal(after["visual.proj"], saved["visual.proj"]), "the unlocked head trains"
    assert torch.equal(after["visual.conv1.weight"], saved["visual.conv1.weight"])
