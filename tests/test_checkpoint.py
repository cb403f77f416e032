"""Checkpoints: a resumed run continues bit for bit, interrupted writes are refused while the
previous checkpoint stays loadable, RNG states come back per rank, and exports load elsewhere."""

from __future__ import annotations

import dataclasses
import datetime
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clip_ray.config import Config, ModelConfig, TextConfig, TrainConfig, VisionConfig
from clip_ray.loss import ClipLoss
from clip_ray.model import build_model, build_model_from_state_dict, clamp_logit_scale
from clip_ray.worker.checkpoint import (
    MANIFEST_FILE, MODEL_FILE, STATE_FILE, IncompleteCheckpointError, capture_rng_state, export_openai_state_dict,
    find_latest_checkpoint, gather_rng_states, load_model_from_checkpoint, load_training_state, restore_rng_state,
    restore_training_state, save_training_state,
)
from clip_ray.worker.optim import build_optimizer, clip_gradients, lr_at, make_grad_scaler, set_lr

# One head width (16) everywhere, so build_model_from_state_dict's single head_width rebuilds both towers.
TEXT = TextConfig(context_length=8, vocab_size=32, width=32, layers=1, head_width=16)
# Patch dropout makes every forward pass draw from torch's RNG, so a wrong RNG restore shows in the losses.
TINY_VIT = ModelConfig(embed_dim=8, text=TEXT,
                       vision=VisionConfig(image_size=16, patch_size=4, width=32, layers=1, head_width=16,
                                           patch_dropout=0.5))
TINY_RESNET = ModelConfig(embed_dim=8, text=TEXT, activation="quick_gelu",
                          vision=VisionConfig(arch="resnet", image_size=32, width=8, resnet_layers=(1, 1, 1, 1),
                                              head_width=16))
TRAIN = TrainConfig(lr=1e-2, warmup_steps=2, steps=9, weight_decay=0.1, grad_clip_norm=1.0, precision="fp32")
BATCH = 4


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def batch(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn from all three global generators (python, numpy, torch), as a data loader might."""
    size = config.vision.image_size
    images = torch.randn(BATCH, 3, size, size) * float(np.random.uniform(0.5, 1.5))
    tokens = torch.randint(1, config.text.vocab_size, (BATCH, config.text.context_length))
    for row in range(BATCH):
        tokens[row, random.randint(2, config.text.context_length):] = 0
    return images, tokens


def train_steps(model, optimizer, config: ModelConfig, first_step: int, count: int) -> list[float]:
    """The loop's step, in small: lr from the step, forward, loss, backward, clip, step, clamp."""
    loss_fn = ClipLoss()
    losses = []
    for step in range(first_step, first_step + count):
        set_lr(optimizer, lr_at(step, TRAIN))
        images, tokens = batch(config)
        out = model(images, tokens)
        loss = loss_fn(out.image_features, out.text_features, out.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(model.parameters(), TRAIN.grad_clip_norm)
        optimizer.step()
        clamp_logit_scale(model)
        losses.append(loss.item())
    return losses


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fresh(config: ModelConfig):
    model = build_model(config)
    return model, build_optimizer(model, TRAIN, config)


def save(directory: Path, model, optimizer, step: int, **extra) -> Path:
    return save_training_state(directory, model=model, optimizer=optimizer, step=step, **extra)


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_resume_continues_bit_for_bit(tmp_path, config):
    seed_everything(0)
    model, optimizer = fresh(config)
    train_steps(model, optimizer, config, 0, 3)
    full_config = Config(model=config, train=TRAIN)
    save(tmp_path / "ckpt", model, optimizer, step=3, epoch=1, samples_seen=3 * BATCH,
         data_position={"epoch": 1, "batches_consumed_in_epoch": 3}, mlflow_run_id="abc123",
         counters={"nonfinite_steps": 2, "data_failures": 5}, config=full_config)
    expected_losses = train_steps(model, optimizer, config, 3, 3)
    expected_params = {name: p.detach().clone() for name, p in model.named_parameters()}
    expected_buffers = {name: b.clone() for name, b in model.named_buffers()}

    seed_everything(123)  # a different process history: everything must come from the checkpoint
    model, optimizer = fresh(config)
    state = load_training_state(tmp_path / "ckpt")
    assert restore_training_state(state, model, optimizer)
    assert (state["step"], state["epoch"], state["samples_seen"]) == (3, 1, 12)
    assert state["data_position"] == {"epoch": 1, "batches_consumed_in_epoch": 3}
    assert state["mlflow_run_id"] == "abc123"
    assert state["counters"] == {"nonfinite_steps": 2, "data_failures": 5}
    assert state["config"]["train"]["lr"] == TRAIN.lr and state["config"]["model"]["embed_dim"] == 8

    losses = train_steps(model, optimizer, config, state["step"], 3)
    assert losses == expected_losses
    for name, p in model.named_parameters():
        assert torch.equal(p, expected_params[name]), name
    for name, b in model.named_buffers():  # BatchNorm running statistics in the ResNet
        assert torch.equal(b, expected_buffers[name]), name


def test_without_the_rng_restore_the_run_diverges(tmp_path):
    """The bit-for-bit test above is not passing by accident: skipping the RNG restore changes the losses."""
    seed_everything(0)
    model, optimizer = fresh(TINY_VIT)
    train_steps(model, optimizer, TINY_VIT, 0, 2)
    save(tmp_path / "ckpt", model, optimizer, step=2)
    expected = train_steps(model, optimizer, TINY_VIT, 2, 2)
    seed_everything(123)
    model, optimizer = fresh(TINY_VIT)
    assert not restore_training_state(load_training_state(tmp_path / "ckpt"), model, optimizer, restore_rng=False)
    assert train_steps(model, optimizer, TINY_VIT, 2, 2) != expected


def test_rng_states_come_back(tmp_path):
    seed_everything(7)
    model, optimizer = fresh(TINY_VIT)
    save(tmp_path / "ckpt", model, optimizer, step=0)
    draws = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], torch.randn(3))
    seed_everything(99)
    restore_rng_state(load_training_state(tmp_path / "ckpt")["rng_states"][0])
    again = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], torch.randn(3))
    assert torch.equal(draws[0], again[0]) and torch.equal(draws[3], again[3])
    assert np.array_equal(draws[1], again[1]) and draws[2] == again[2]


def test_rng_capture_restore_keeps_numpys_cached_gaussian():
    np.random.seed(3)
    np.random.standard_normal()  # leaves the second of a Box-Muller pair cached
    state = capture_rng_state()
    expected = np.random.standard_normal(3)
    restore_rng_state(state)
    assert np.array_equal(np.random.standard_normal(3), expected)


def test_grad_scaler_state_round_trips(tmp_path):
    model, optimizer = fresh(TINY_VIT)
    scaler = make_grad_scaler("fp16", "cpu")
    scaler.scale(torch.tensor(1.0))  # creates the scale tensor lazily
    scaler.update(new_scale=1024.0)
    save(tmp_path / "ckpt", model, optimizer, step=0, scaler=scaler)
    restored = make_grad_scaler("fp16", "cpu")
    restore_training_state(load_training_state(tmp_path / "ckpt"), model, optimizer, scaler=restored)
    assert restored.get_scale() == 1024.0


def test_values_weights_only_cannot_load_are_refused_at_save_time(tmp_path):
    model, optimizer = fresh(TINY_VIT)
    with pytest.raises(TypeError, match=r"data_position\.batches.*int64"):
        save(tmp_path / "ckpt", model, optimizer, step=1, data_position={"batches": np.int64(3)})
    assert not (tmp_path / "ckpt" / MANIFEST_FILE).exists()


def test_files_load_with_weights_only(tmp_path):
    model, optimizer = fresh(TINY_VIT)
    save(tmp_path / "ckpt", model, optimizer, step=4, config=Config(model=TINY_VIT))
    for name in (MODEL_FILE, STATE_FILE):
        torch.load(tmp_path / "ckpt" / name, weights_only=True)


def test_interrupted_writes_are_refused_and_the_previous_checkpoint_survives(tmp_path):
    seed_everything(0)
    model, optimizer = fresh(TINY_VIT)
    good = save(tmp_path / "run" / "step-3", model, optimizer, step=3)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    train_steps(model, optimizer, TINY_VIT, 3, 1)

    # Killed while the first file was still under its temporary name.
    only_temp = tmp_path / "run" / "step-4"
    only_temp.mkdir()
    (only_temp / f".{MODEL_FILE}.tmp-1234").write_bytes(b"partial")
    # Killed after the data files but before the manifest that marks completion.
    no_manifest = save(tmp_path / "run" / "step-5", model, optimizer, step=5)
    (no_manifest / MANIFEST_FILE).unlink()
    # A file that does not match the manifest (e.g. truncated by a full disk).
    truncated = save(tmp_path / "run" / "step-6", model, optimizer, step=6)
    data = (truncated / STATE_FILE).read_bytes()
    (truncated / STATE_FILE).write_bytes(data[: len(data) // 2])

    for broken in (only_temp, no_manifest, truncated):
        with pytest.raises(IncompleteCheckpointError, match=str(broken)):
            load_training_state(broken)
        with pytest.raises(IncompleteCheckpointError, match=str(broken)):
            load_model_from_checkpoint(broken)

    assert find_latest_checkpoint(tmp_path / "run") == good
    model, optimizer = fresh(TINY_VIT)
    restore_training_state(load_training_state(good), model, optimizer)
    assert all(torch.equal(p, expected[name]) for name, p in model.named_parameters())


def test_a_refused_save_leaves_the_checkpoint_and_a_new_save_replaces_it(tmp_path):
    model, optimizer = fresh(TINY_VIT)
    directory = save(tmp_path / "ckpt", model, optimizer, step=1)
    with pytest.raises(TypeError):
        save(directory, model, optimizer, step=2, counters={"bad": object()})
    assert load_training_state(directory)["step"] == 1  # a refused save touches nothing
    save(directory, model, optimizer, step=2)
    assert load_training_state(directory)["step"] == 2


def test_find_latest_checkpoint_picks_the_highest_step(tmp_path):
    model, optimizer = fresh(TINY_VIT)
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    for step in (20, 100, 3):  # directory names sort differently from steps
        save(tmp_path / "run" / f"checkpoint_{step}", model, optimizer, step=step)
    assert find_latest_checkpoint(tmp_path) == tmp_path / "run" / "checkpoint_100"


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_model_for_evaluation_and_openai_export(tmp_path, config):
    seed_everything(0)
    model, optimizer = fresh(config)
    train_steps(model, optimizer, config, 0, 1)
    model.eval()
    images, tokens = batch(config)
    with torch.no_grad():
        expected = model(images, tokens)

    directory = save(tmp_path / "ckpt", model, optimizer, step=1)
    loaded = load_model_from_checkpoint(directory)
    assert loaded.config == config and not loaded.training
    with torch.no_grad():
        out = loaded(images, tokens)
    assert torch.equal(out.image_features, expected.image_features)
    assert torch.equal(out.text_features, expected.text_features)

    exported = export_openai_state_dict(model, tmp_path / "openai.pt")
    state_dict = torch.load(exported, weights_only=True)
    assert set(state_dict) == set(model.state_dict())
    rebuilt = build_model_from_state_dict(state_dict, activation=config.activation, head_width=16).eval()
    with torch.no_grad():
        out = rebuilt(images, tokens)
    torch.testing.assert_close(out.image_features, expected.image_features)
    torch.testing.assert_close(out.text_features, expected.text_features)

    half = torch.load(export_openai_state_dict(model, tmp_path / "openai16.pt", dtype=torch.float16),
                      weights_only=True)
    assert all(t.dtype == torch.float16 for t in half.values() if t.is_floating_point())
    from_half = load_model_from_checkpoint(tmp_path / "openai16.pt", activation=config.activation, head_width=16)
    with torch.no_grad():
        out = from_half(images, tokens)
    torch.testing.assert_close(out.image_features, expected.image_features, atol=2e-2, rtol=0)


# --------------------------------------------------------------------------- two ranks


def _two_rank_worker(rank: int, init_file: str, directory: str) -> None:
    """Each rank seeds differently; rank 0 saves every rank's RNG state; both resume from the one checkpoint."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = build_model(TINY_VIT)  # not DDP-wrapped: its import of torch._dynamo costs seconds per rank
        optimizer = build_optimizer(model, TRAIN, TINY_VIT)
        seed_everything(1000 + rank)
        rng_states = gather_rng_states()
        if rank == 0:
            save_training_state(directory, model=model, optimizer=optimizer, step=1, rng_states=rng_states)
        expected = (torch.rand(4), np.random.rand(2), random.random())
        dist.barrier()

        seed_everything(5)  # the same on both ranks: only the restore can make them differ again
        state = load_training_state(directory)
        assert len(state["rng_states"]) == 2
        assert restore_training_state(state, model, optimizer)
        again = (torch.rand(4), np.random.rand(2), random.random())
        assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
        assert expected[2] == again[2]
        torch.save(again[0], Path(directory).parent / f"draw-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_each_rank_gets_its_own_rng_state_back(tmp_path):
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "ckpt")), nprocs=2, join=True)
    draws = [torch.load(tmp_path / f"draw-{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert not torch.equal(draws[0], draws[1])


def test_wrapped_models_save_and_load_under_their_own_names(tmp_path):
    """torch.compile's wrapper (like DDP's) prefixes every name; checkpoints hold the bare model's names."""
    model, optimizer = fresh(TINY_VIT)
    compiled = torch.compile(model)  # wrapping compiles nothing until the first call
    assert all(name.startswith("_orig_mod.") for name in compiled.state_dict())
    save(tmp_path / "ckpt", compiled, optimizer, step=0)
    state = load_training_state(tmp_path / "ckpt")
    assert set(state["model"]) == set(model.state_dict())
    bare = build_model(TINY_VIT)
    restore_training_state(state, torch.compile(bare))
    assert all(torch.equal(p, q) for p, q in zip(bare.parameters(), model.parameters()))


def test_model_config_survives_the_round_trip(tmp_path):
    config = dataclasses.replace(TINY_VIT, name="renamed", init_logit_bias=-5.0)
    model, optimizer = fresh(config)
    save(tmp_path / "ckpt", model, optimizer, step=0)
    assert load_training_state(tmp_path / "ckpt")["model_config"]["name"] == "renamed"
    assert load_model_from_checkpoint(tmp_path / "ckpt").config == config
