"""How the model is spread over the workers: DDP (a whole copy each) or FSDP2 (a shard of every block each).

`train.strategy: fsdp` calls `fully_shard` on every residual block of both
towers (a ViT's or the text transformer's blocks, a ResNet's bottlenecks and its
attention pool) and then on the whole model for what is left (embeddings,
projections, final norms). Each rank keeps 1/world of every parameter, of its
gradient and of its Adam state; a block's parameters are gathered just before
it computes, forward and backward, and freed after. With bf16 the gathered
copies are bf16 and gradients are reduced in fp32 (the mixed precision policy).

Two things FSDP does not do for us, both handled here:

- The learned temperature (and SigLIP's bias) are 0-dim parameters, which
  FSDP2 refuses to shard. They stay whole on every rank, outside FSDP, and
  `average_unsharded_grads` averages their gradients by hand, as DDP would.
- A sharded model's forward is a collective. Evaluation reads a different
  number of batches on each rank, so it runs on `full_model_copy`, an
  ordinary module with the gathered weights (4 bytes a parameter on each
  device while it lasts: 10 GB for ViT-bigG/14).

Checkpoints hold full state dicts, keyed by parameter name (`full_state_dicts`
gathers them on rank 0), so a run saved under either strategy resumes under
either, at any world size (`load_model_state`, `load_optimizer_state`).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from clip_ray.loss import rank_and_world
from clip_ray.model import build_model, unwrap_model
from clip_ray.model.layers import ResidualBlock
from clip_ray.model.resnet import AttentionPool2d, Bottleneck

# The modules that become one FSDP unit each: gathered together, freed together.
SHARDED_BLOCKS = (ResidualBlock, Bottleneck, AttentionPool2d)

log = logging.getLogger(__name__)

_FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(unwrap_model(model), FSDPModule)


def unsharded_params(model: nn.Module) -> list[nn.Parameter]:
    """The 0-dim parameters (temperature, bias): FSDP2 cannot shard them, every rank holds them whole."""
    return [p for p in model.parameters() if p.ndim == 0]


def wrap_for_training(model: nn.Module, strategy: str, device: torch.device, precision: str = "fp32",
                      shard_alone: bool = False) -> nn.Module:
    """The module the training step runs: `model` itself (one worker), DDP-wrapped, or sharded in place.
    `shard_alone`: FSDP even on a one-rank group, which only costs (for measuring that cost)."""
    if rank_and_world()[1] == 1 and not (shard_alone and strategy == "fsdp"):
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if strategy != "fsdp":
        raise ValueError(f"unknown strategy {strategy!r}: expected 'ddp' or 'fsdp'")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # FSDP's default device mesh takes the current device
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for module in model.modules():
        if isinstance(module, SHARDED_BLOCKS):
            fully_shard(module, mp_policy=policy)
    # The root's leftovers are small and used at both ends of the step: keep them gathered through it.
    fully_shard(model, mp_policy=policy, reshard_after_forward=False, ignored_params=set(unsharded_params(model)))
    return model


def average_unsharded_grads(model: nn.Module) -> None:
    """Averages the gradients FSDP left alone (the 0-dim parameters) over the ranks; a no-op unless sharded."""
    module = unwrap_model(model)
    if not isinstance(module, FSDPModule):
        return
    grads = [p.grad for p in unsharded_params(module) if p.grad is not None]
    if not grads:
        return
    flat = torch.stack([g.reshape(()) for g in grads])
    dist.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= dist.get_world_size()
    for grad, value in zip(grads, flat):
        grad.copy_(value)


# --------------------------------------------------------------------------- whole weights


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the whole model on rank 0, on the CPU, the optimizer's keyed by
    parameter name; other ranks get ({}, {}) when sharded. Collective under FSDP: call it on every rank."""
    module = unwrap_model(model)
    if isinstance(module, FSDPModule):
        return (get_model_state_dict(module, options=_FULL_ON_RANK0),
                get_optimizer_state_dict(module, optimizer, options=_FULL_ON_RANK0))
    return module.state_dict(), optimizer_state_by_name(module, optimizer)


def full_model_copy(model: nn.Module) -> nn.Module:
    """`model` itself when every rank holds it whole; under FSDP a new unsharded CLIP with the gathered
    weights on every rank (collective), whose forward needs no other rank."""
    module = unwrap_model(model)
    if not isinstance(module, FSDPModule):
        return module
    weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    copy = build_model(module.config, device="meta")
    copy.load_state_dict(weights, strict=True, assign=True)
    return copy.train(module.training)


def load_model_state(model: nn.Module, state_dict: dict) -> None:
    """A full state dict (every rank has it) into the model, whole or sharded; strict."""
    module = unwrap_model(model)
    if isinstance(module, FSDPModule):
        set_model_state_dict(module, dict(state_dict), options=StateDictOptions(full_state_dict=True))
    else:
        module.load_state_dict(state_dict, strict=True)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """A saved optimizer state into `optimizer`: keyed by parameter name (any strategy, any world size),
    or by position (checkpoints written before names were used; same model, not sharded)."""
    module = unwrap_model(model)
    by_name = any(isinstance(p, str) for group in state["param_groups"] for p in group["params"])
    if not by_name:
        if isinstance(module, FSDPModule):
            raise ValueError("this checkpoint's optimizer state is keyed by position, which only an unsharded "
                             "model can load; resume it once with train.strategy=ddp to rewrite it")
        optimizer.load_state_dict(state)
        return
    state, unlocked_since = trainable_part(module, optimizer, state)
    if isinstance(module, FSDPModule):
        # Not strict where parameters unlocked since have no saved state; torch then gives them a placeholder.
        options = StateDictOptions(full_state_dict=True, strict=not unlocked_since)
        set_optimizer_state_dict(module, optimizer, state, options=options)
        params = dict(module.named_parameters())
        for name in unlocked_since:  # fresh, as at the start of a run
            optimizer.state.pop(params[name], None)
    else:
        optimizer.load_state_dict(optimizer_state_by_position(module, optimizer, state))


def trainable_part(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> tuple[dict, list[str]]:
    """A name-keyed optimizer state cut to the parameters `optimizer` trains now, and the names it has no
    state for.

    They differ when a run resumes with other tower locks (model.lock_*) than its checkpoint was written
    with: a parameter locked since drops its Adam moments, one unlocked since starts with fresh ones (as at
    the start of a run), and a warning names both. The weights themselves always come back whole.
    A name the model does not have at all is an error.
    """
    saved = [name for group in state["param_groups"] for name in group["params"]]
    current = _param_names(module, optimizer)
    if set(saved) == set(current):
        return state, []
    foreign = sorted(set(saved) - {name for name, _ in module.named_parameters()})
    if foreign:
        raise ValueError(f"optimizer state does not match the model: unknown parameters {foreign[:5]}")
    locked_since, unlocked_since = sorted(set(saved) - set(current)), sorted(set(current) - set(saved))
    if rank_and_world()[0] == 0:
        changes = [f"{len(names)} parameter tensors {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                   for names, what in ((locked_since, "locked since drop their optimizer state"),
                                       (unlocked_since, "unlocked since start with a fresh one"))
                   if names]
        log.warning("resuming with other tower locks (model.lock_*) than the checkpoint was written with: %s",
                    "; ".join(changes))
    saved_groups = {group.get("name"): group for group in state["param_groups"]}
    position, groups = 0, []
    for i, group in enumerate(optimizer.param_groups):  # each group's settings from the saved group of its name
        names = current[position:position + len(group["params"])]
        position += len(names)
        groups.append({**(saved_groups.get(group.get("name")) or state["param_groups"][i]), "params": names})
    keep = set(current)
    return {"state": {name: value for name, value in state["state"].items() if name in keep},
            "param_groups": groups}, unlocked_since


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order its state dict numbers them."""
    names = {id(p): name for name, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state_by_name(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with parameter names where it has positions (the layout FSDP's full
    optimizer state dict has)."""
    state = optimizer.state_dict()
    names = _param_names(module, optimizer)
    return {"state": {names[i]: value for i, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                             for group in state["param_groups"]]}


def optimizer_state_by_position(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of `optimizer_state_by_name` for this optimizer; a name it does not know is an error."""
    position = {name: i for i, name in enumerate(_param_names(module, optimizer))}
    missing = sorted(set(position) - {n for group in state["param_groups"] for n in group["params"]})
    unknown = sorted({n for group in state["param_groups"] for n in group["params"]} - set(position))
    if missing or unknown:
        raise ValueError(f"optimizer state does not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [position[n] for n in group["params"]]}
                             for group in state["param_groups"]]}
