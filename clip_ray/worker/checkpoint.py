"""Checkpoints that resume a run exactly, written so a crash never leaves one that half-loads.

A checkpoint is a directory (the loop hands it to `ray.train.Checkpoint.from_directory`):

    model.pt            {"model_config": dict | None, "state_dict": ...}  enough for evaluation
    training_state.pt   optimizer, grad scaler, counters, data position, RNG states, config
    manifest.json       written last: step, epoch and each file's size

Every file goes to a temporary name in the same directory and is renamed into
place (os.replace is atomic within a filesystem); the manifest comes last, so a
directory without one, or whose files do not match its sizes, is an interrupted
write and is refused by name.

Everything is stored as tensors and plain Python values because loading uses
torch.load(weights_only=True), which refuses arbitrary pickled objects (numpy
arrays included). `save_training_state` checks that before writing, so a value
that could not be loaded back fails at save time, not at resume time.

RNG states: one entry per rank (`gather_rng_states` collects them on every rank;
rank 0 writes them). Each entry holds Python's `random`, numpy's global
generator, torch's CPU generator and, where CUDA is available, the generator of
the current CUDA device. `restore_training_state` gives rank r entry r, so a
resumed run with the same world size draws the same numbers (patch dropout,
augmentation in the loop's process). Ray Data's preprocessing runs in other
processes; the data position, not these states, makes the input exact.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clip_ray.config import ModelConfig, from_dict, to_dict
from clip_ray.loss import rank_and_world
from clip_ray.model import CLIP, build_model, build_model_from_state_dict, unwrap_model
from clip_ray.worker.sharding import full_state_dicts, load_model_state, load_optimizer_state

FORMAT_VERSION = 1
MODEL_FILE = "model.pt"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"


class IncompleteCheckpointError(RuntimeError):
    """The directory is not a complete checkpoint (an interrupted write, or not a checkpoint at all)."""


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """This process's generators as tensors and plain values (what weights_only loading accepts)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Puts back a `capture_rng_state()`; the CUDA entry goes to the current device when both exist."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].cpu().numpy().astype(np.uint32),
                         np_state["position"], np_state["has_gauss"], np_state["cached_gaussian"]))
    # The setters want CPU byte tensors, whatever map_location the checkpoint was loaded with.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def gather_rng_states() -> list[dict]:
    """Every rank's `capture_rng_state()`, indexed by rank. Collective: call it on all ranks."""
    _, world_size = rank_and_world()
    if world_size == 1:
        return [capture_rng_state()]
    states: list[Any] = [None] * world_size
    dist.all_gather_object(states, capture_rng_state())
    return states


# --------------------------------------------------------------------------- writing


_PLAIN_TYPES = (torch.Tensor, int, float, bool, str, type(None), torch.Size)


def _check_loadable(value: Any, where: str) -> None:
    """Raises TypeError naming the first value torch.load(weights_only=True) would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoints take str/int keys")
            _check_loadable(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_loadable(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise TypeError(f"{where}={value!r} is a {type(value).__name__}; a checkpoint stores only tensors "
                        "and plain Python values (convert numpy scalars with int()/float())")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, write) -> int:
    """Runs write(file) on a temporary file beside `path`, then renames it into place; returns the size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


def _config_dict(config: Any) -> dict | None:
    if config is None or isinstance(config, dict):
        return config
    return to_dict(config)


def save_training_state(
    directory: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    epoch: int = 0,
    samples_seen: int = 0,
    data_position: dict | None = None,
    scaler: torch.amp.GradScaler | None = None,
    scheduler: Any = None,
    rng_states: list[dict] | None = None,
    mlflow_run_id: str | None = None,
    counters: dict[str, int] | None = None,
    config: Any = None,
    state_dicts: tuple[dict, dict] | None = None,
) -> Path:
    """Writes a complete checkpoint into `directory` (created if needed); returns it.

    `step` counts optimiser steps taken. `data_position` is the loop's own
    bookkeeping (e.g. {"epoch": e, "batches_consumed_in_epoch": k}); `counters`
    e.g. {"nonfinite_steps": 0, "data_failures": 0}; `config` a Config or its dict.
    `rng_states` defaults to this process's alone; under DDP pass
    `gather_rng_states()` (called on every rank). `scheduler` is only for a
    stateful one: the project's schedule is `optim.lr_at(step)`. `state_dicts`: the (model, optimizer)
    state dicts that `sharding.full_state_dicts` gathered, required for an FSDP-sharded model (gathering
    is a collective, and this runs on rank 0 alone). The optimizer's state is stored keyed by parameter
    name, so a run resumes under either strategy at any world size.
    """
    model_state, optimizer_state = state_dicts if state_dicts is not None else full_state_dicts(model, optimizer)
    model = unwrap_model(model)
    model_config = getattr(model, "config", None)
    model_payload = {
        "model_config": to_dict(model_config) if isinstance(model_config, ModelConfig) else None,
        "state_dict": model_state,
    }
    training_payload = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "epoch": int(epoch),
        "samples_seen": int(samples_seen),
        "data_position": data_position or {},
        "optimizer": optimizer_state,
        "scaler": scaler.state_dict() if scaler is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng_states": rng_states if rng_states is not None else [capture_rng_state()],
        "mlflow_run_id": mlflow_run_id,
        "counters": counters or {},
        "config": _config_dict(config),
    }
    _check_loadable(model_payload, MODEL_FILE)
    _check_loadable(training_payload, STATE_FILE)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Whatever was here before stops counting as complete before any of it is replaced.
    (directory / MANIFEST_FILE).unlink(missing_ok=True)

    sizes = {
        MODEL_FILE: _write_atomically(directory / MODEL_FILE, lambda f: torch.save(model_payload, f)),
        STATE_FILE: _write_atomically(directory / STATE_FILE, lambda f: torch.save(training_payload, f)),
    }
    manifest = {"format_version": FORMAT_VERSION, "step": int(step), "epoch": int(epoch),
                "samples_seen": int(samples_seen), "files": sizes}
    _fsync_directory(directory)
    _write_atomically(directory / MANIFEST_FILE, lambda f: f.write(json.dumps(manifest, indent=2).encode()))
    _fsync_directory(directory)
    return directory


# --------------------------------------------------------------------------- reading


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a complete checkpoint; IncompleteCheckpointError naming the path otherwise."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise IncompleteCheckpointError(f"{directory}: no {MANIFEST_FILE}, so not a complete checkpoint "
                                        "(an interrupted write, or not a checkpoint directory)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise IncompleteCheckpointError(f"{manifest_path}: unreadable manifest ({err})") from None
    for name, size in files.items():
        path = directory / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise IncompleteCheckpointError(f"{path}: expected {size} bytes as the manifest says, found "
                                            f"{'no file' if actual is None else f'{actual} bytes'}")
    return manifest


def is_complete_checkpoint(directory: str | Path) -> bool:
    try:
        read_manifest(directory)
    except IncompleteCheckpointError:
        return False
    return True


def _load(path: Path, map_location: Any, mmap: bool = False) -> Any:
    return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def load_training_state(directory: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Everything `save_training_state` wrote, as one dict: its keyword names plus "model" (the
    state dict), "model_config" and "format_version". Refuses an incomplete checkpoint.

    mmap=True (CPU only) maps the files instead of reading them: the workers of a node resuming
    together share one copy in the page cache, and each reads only the slices it keeps (FSDP)."""
    directory = Path(directory)
    read_manifest(directory)
    model_payload = _load(directory / MODEL_FILE, map_location, mmap)
    state = _load(directory / STATE_FILE, map_location, mmap)
    if state.get("format_version") != FORMAT_VERSION:
        raise IncompleteCheckpointError(f"{directory}: checkpoint format {state.get('format_version')!r}, "
                                        f"this code reads {FORMAT_VERSION}")
    state["model"] = model_payload["state_dict"]
    state["model_config"] = model_payload["model_config"]
    return state


def restore_training_state(state: dict, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                           scaler: torch.amp.GradScaler | None = None, scheduler: Any = None,
                           restore_rng: bool = True) -> bool:
    """Loads a `load_training_state` dict into live objects (model strictly, through any wrapper, whole or
    FSDP-sharded: every rank passes the whole state).

    Returns whether this rank's RNG state was restored: False when the
    checkpoint came from fewer ranks than this run has (the loop should then
    seed this rank itself) or `restore_rng` is off. Step, epoch, data position,
    counters and the run id are left for the caller to read from `state`.
    """
    load_model_state(model, state["model"])
    if optimizer is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
    # A disabled scaler saves {}; loading that into an enabled one (or the reverse) has nothing to carry.
    if scaler is not None and scaler.is_enabled() and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    rank, _ = rank_and_world()
    if not restore_rng or rank >= len(state["rng_states"]):
        return False
    restore_rng_state(state["rng_states"][rank])
    return True


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step anywhere under `root` (newest on a tie), or None.

    For resuming outside Ray; inside Ray Train use `ray.train.get_checkpoint()`.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    best: tuple[int, float, str] | None = None
    for manifest_path in root.rglob(MANIFEST_FILE):
        directory = manifest_path.parent
        try:
            step = int(read_manifest(directory)["step"])
        except (IncompleteCheckpointError, KeyError, ValueError, TypeError):
            continue
        key = (step, manifest_path.stat().st_mtime, str(directory))
        if best is None or key > best:
            best = key
    return Path(best[2]) if best is not None else None


def load_model_from_checkpoint(path: str | Path, map_location: Any = "cpu", **from_state_dict_kwargs) -> CLIP:
    """A CLIP in eval mode from a checkpoint directory, its model.pt, or a plain OpenAI-layout state dict.

    With a stored model config the model is rebuilt exactly; a plain state dict
    (e.g. from `export_openai_state_dict`) goes through build_model_from_state_dict,
    which reads the shapes from the weights and takes `from_state_dict_kwargs`
    (activation, head_width, pad_token_id) for what the weights do not say.
    """
    path = Path(path)
    if path.is_dir():
        read_manifest(path)
        path = path / MODEL_FILE
    payload = _load(path, map_location)
    if "state_dict" in payload and "model_config" in payload:
        if payload["model_config"] is None:
            model = build_model_from_state_dict(payload["state_dict"], **from_state_dict_kwargs)
        else:
            model = build_model(from_dict(ModelConfig, payload["model_config"]), device="meta")
            model.load_state_dict(payload["state_dict"], strict=True, assign=True)
            model = model.float()
    else:
        model = build_model_from_state_dict(payload, **from_state_dict_kwargs)
    return model.eval()


def export_openai_state_dict(model: nn.Module, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the bare state dict in OpenAI's layout (what OpenCLIP and OpenAI's loader read).

    Floating-point tensors become `dtype` (float16 halves the file, as OpenAI's
    releases are); integer buffers such as BatchNorm's batch count stay as they are.
    """
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"export dtype must be float32, float16 or bfloat16, got {dtype}")
    state_dict = {
        name: (tensor.to(dtype) if tensor.is_floating_point() else tensor).detach().cpu().clone()
        for name, tensor in unwrap_model(model).state_dict().items()
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, lambda f: torch.save(state_dict, f))
    return path
