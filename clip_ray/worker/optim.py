"""The optimisation recipe of the CLIP paper (Radford et al. 2021, section 2.5).

- AdamW with decoupled weight decay on the matrices only: gains, biases,
  embeddings and the temperature are left alone, since shrinking them towards
  zero has no regularising meaning (a LayerNorm gain of 0 switches a feature off).
- Adam's betas and eps per image-tower family, as the paper tuned them.
- Linear warm-up then cosine decay.

The learning-rate schedule is a pure function of the step (`lr_at`) that the
loop writes into the optimiser before every step (`set_lr`). There is no
scheduler object whose state could drift from the step counter, so resuming
from a checkpoint needs nothing but the step.

Mixed precision (autocast: clip_ray.model.precision): bf16 needs nothing more; fp16 also needs a GradScaler, and
every gradient read (clipping, the norm we log) must come after unscaling.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from clip_ray.config import ModelConfig, TrainConfig

# Modules whose every parameter is a gain or a shift of a normalisation.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
# Parameters held directly (not in an nn.Embedding) that are looked up or added, not multiplied.
_EMBEDDING_NAMES = ("positional_embedding", "class_embedding")
# The learned temperature and SigLIP's bias: decaying them would pull the logits' scale towards 1.
_TEMPERATURE_NAMES = ("logit_scale", "logit_bias")

# The paper's Adam settings per image-tower family (betas, eps).
PAPER_ADAM = {
    "vit": ((0.9, 0.98), 1e-6),
    "resnet": ((0.9, 0.999), 1e-8),
}


# --------------------------------------------------------------------------- weight decay


def _decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether `param`, registered on `module` under `name`, gets weight decay."""
    if isinstance(module, (*_NORM_TYPES, nn.Embedding)):
        return False
    if name.endswith("bias") or name in _EMBEDDING_NAMES or name in _TEMPERATURE_NAMES:
        return False
    # Anything else that is not a matrix (or conv kernel) is some gain or offset we do not know of.
    return param.ndim >= 2


def split_decay_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) trainable parameter names, in `named_parameters` order."""
    decided: dict[str, bool] = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                decided[f"{module_name}.{name}" if module_name else name] = _decays(module, name, param)
    # named_parameters drops tied duplicates and fixes the order the optimiser state is saved in.
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    return [n for n in names if decided[n]], [n for n in names if not decided[n]]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: matrices with `weight_decay`, everything else without."""
    params = dict(model.named_parameters())
    decayed, not_decayed = split_decay_names(model)
    return [
        {"name": "decay", "params": [params[n] for n in decayed], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [params[n] for n in not_decayed], "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- optimiser


def adam_settings(train_cfg: TrainConfig, model_cfg: ModelConfig) -> tuple[tuple[float, float], float]:
    """(betas, eps): the config's where set, the paper's for the image tower's family otherwise."""
    paper_betas, paper_eps = PAPER_ADAM[model_cfg.vision.arch]
    betas = tuple(train_cfg.betas) if train_cfg.betas is not None else paper_betas
    eps = train_cfg.eps if train_cfg.eps is not None else paper_eps
    return betas, eps


def build_optimizer(model: nn.Module, train_cfg: TrainConfig, model_cfg: ModelConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the fused CUDA kernel when every parameter lives on a GPU.

    The groups start at the schedule's step-0 learning rate; the loop calls
    `set_lr(optimizer, lr_at(step, train_cfg))` before each step.
    """
    betas, eps = adam_settings(train_cfg, model_cfg)
    # The fused kernel is for whole tensors; FSDP's sharded parameters use the (default) foreach one.
    on_cuda = torch.cuda.is_available() and all(p.is_cuda and not isinstance(p, DTensor) for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, train_cfg.weight_decay), lr=lr_at(0, train_cfg),
                             betas=betas, eps=eps, fused=True if on_cuda else None)


# --------------------------------------------------------------------------- schedule


def lr_at(step: int, train_cfg: TrainConfig) -> float:
    """Learning rate of optimiser step `step` (0-based).

    Warm-up: step s < warmup_steps uses lr * (s + 1) / warmup_steps, a line from 0
    whose last point is the peak, so no step is spent at lr 0. Then cosine decay
    from lr at step warmup_steps to lr * min_lr_ratio at step `train_cfg.steps`
    (held there beyond), or the peak held ("constant").
    """
    peak, warmup = train_cfg.lr, train_cfg.warmup_steps
    if step < warmup:
        return peak * (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return peak
    floor = peak * train_cfg.min_lr_ratio
    progress = min(1.0, (step - warmup) / max(1, train_cfg.steps - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Writes `lr` into every parameter group; returns it for logging."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# --------------------------------------------------------------------------- mixed precision


def make_grad_scaler(precision: str, device_type: str) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16: bf16 has fp32's exponent range and needs none.

    A disabled scaler passes calls straight through, so the loop runs the same
    code (scale, step, update) whatever the precision.
    """
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16")


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float | None,
                   optimizer: torch.optim.Optimizer | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """Global gradient norm before clipping (a 0-d tensor; no device sync), clipped to `max_norm` if given.

    With an enabled scaler the gradients are unscaled first (scaler.unscale_,
    once per step: `scaler.step` then knows not to do it again), so the norm
    and the threshold are in true units. A non-finite norm (an fp16 overflow)
    is returned as it is; `scaler.step` will skip that step.
    Call it after backward, when gradients are already averaged over the ranks (DDP, FSDP). Under
    FSDP the norm is over every rank's shards, the same on every rank.
    """
    if scaler is not None and scaler.is_enabled():
        if optimizer is None:
            raise ValueError("clip_gradients needs the optimizer to unscale an enabled GradScaler")
        scaler.unscale_(optimizer)
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    # FSDP's gradients are DTensor shards, the 0-dim parameters' plain tensors: torch takes the norm of
    # one kind at a time, so norm each kind over all ranks and combine.
    kinds = [[p for p in params if isinstance(p.grad, DTensor) == sharded] for sharded in (True, False)]
    kinds = [kind for kind in kinds if kind]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in kind]) for kind in kinds]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack([n.to(norms[0].device)
                                                                                   for n in norms]))
    if max_norm is not None:
        for kind in kinds:
            torch.nn.utils.clip_grads_with_norm_(kind, max_norm, norm)
    return norm
