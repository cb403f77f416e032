"""One optimiser step of CLIP training, with accumulation that keeps every negative.

A worker's batch of B pairs is one optimiser step. With accumulation k it is
encoded as k micro-batches of B/k, GradCache-style (Gao et al. 2021):

  1. encode every micro-batch without a graph (activation memory of one micro-batch);
  2. score the concatenated features as leaves: the loss sees all B local rows
     against all global columns, exactly as without accumulation, and its
     backward gives each feature its gradient (and the temperature its own),
     `train.loss_chunk_rows` rows at a time (loss.backward_in_chunks);
  3. re-encode each micro-batch with a graph and back-propagate its slice of
     those feature gradients; DDP synchronises on the last micro-batch only,
     FSDP reduce-scatters every micro-batch's gradients into the sharded sum
     (deferring would hold whole unsharded gradients, what FSDP is there to avoid).

Both passes run the same model (compiled when train.compile is set), and patch
dropout keeps the patches drawn once for the whole local batch before pass 1,
so the replay drops exactly what the cached pass dropped, compiled or not, and
the step equals the unaccumulated one. BatchNorm statistics are rolled back
after the first pass so that they count each micro-batch once; ResNets'
BatchNorm still normalises per micro-batch, as with any accumulation.

A non-finite loss, or (without an fp16 loss scaler, whose own job that is) a
non-finite gradient, skips the step on every rank: one all-reduce after the
backward makes the ranks agree, so collectives stay matched. Skips are counted.
The same all-reduce tells every rank whether all of them have another batch this
epoch (their shares of an epoch differ in length), at no extra synchronisation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from clip_ray.config import TrainConfig
from clip_ray.loss import ContrastiveLoss, rank_and_world
from clip_ray.model import clamp_logit_scale, unwrap_model
from clip_ray.model.precision import autocast_context
from clip_ray.worker.optim import clip_gradients
from clip_ray.worker.sharding import average_unsharded_grads


class NonFiniteLossError(RuntimeError):
    """Several optimiser steps in a row had a NaN or infinite loss."""


@dataclass
class StepResult:
    loss: float
    skipped: bool
    grad_norm: float | None = None
    more: bool = True  # every rank has another batch this epoch


def _all_ranks_agree(values: tuple[torch.Tensor, ...], has_next_batch: bool) -> tuple[bool, bool]:
    """(every value is finite on every rank, every rank has another batch): one all-reduce, one host sync."""
    finite = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()
    flags = torch.stack([finite.to(torch.float32), finite.new_tensor(float(has_next_batch), dtype=torch.float32)])
    if rank_and_world()[1] > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    finite, more = flags.tolist()
    return bool(finite), bool(more)


def _batch_norm_buffers(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    return [(m, {name: getattr(m, name).clone() for name in ("running_mean", "running_var", "num_batches_tracked")})
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _restore_batch_norm_buffers(saved: list[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    for module, buffers in saved:
        for name, value in buffers.items():
            getattr(module, name).copy_(value)


class TrainStep:
    """Forward, backward and update for one worker; `model` may be DDP-wrapped or FSDP-sharded."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: ContrastiveLoss,
                 scaler: torch.amp.GradScaler, train_cfg: TrainConfig, device: torch.device):
        self.model = model
        self.module = unwrap_model(model)
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scaler = scaler
        self.cfg = train_cfg
        self.device = device
        self.consecutive_nonfinite = 0
        self.total_nonfinite = 0

    def autocast(self):
        return autocast_context(self.cfg.precision, self.device.type)

    def __call__(self, images: torch.Tensor, texts: torch.Tensor, has_next_batch: bool = True) -> StepResult:
        if self.cfg.compile and self.cfg.compile_mode == "reduce-overhead":
            # CUDA graphs reuse their output memory: tell them the previous step's outputs are dead.
            torch.compiler.cudagraph_mark_step_begin()
        self.optimizer.zero_grad(set_to_none=True)
        k = self.cfg.accumulation_steps
        if k == 1:
            loss = self._backward_whole(images, texts)
        else:
            loss = self._backward_accumulated(images.chunk(k), texts.chunk(k))
        average_unsharded_grads(self.module)  # FSDP: the temperature's gradient, as DDP would average it
        grad_norm = clip_gradients(self.module.parameters(), self.cfg.grad_clip_norm, self.optimizer, self.scaler)
        # An fp16 scaler skips steps with inf/NaN gradients itself (and lowers its scale): not a failure.
        checked = (loss,) if self.scaler.is_enabled() else (loss, grad_norm)
        finite, more = _all_ranks_agree(checked, has_next_batch)
        if not finite:
            return self._skip(more)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        clamp_logit_scale(self.module)
        self.consecutive_nonfinite = 0
        return StepResult(loss=float(loss), skipped=False, grad_norm=float(grad_norm), more=more)

    def _skip(self, more: bool) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # closes the step clip_gradients unscaled (and lowers the scale)
        self.consecutive_nonfinite += 1
        self.total_nonfinite += 1
        if self.consecutive_nonfinite >= self.cfg.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} optimiser steps in a row had a non-finite loss or gradient "
                f"(train.max_consecutive_nonfinite={self.cfg.max_consecutive_nonfinite}); stopping. "
                "The last checkpoint written before them is intact; lower train.lr, enable "
                "train.grad_clip_norm or use bf16 instead of fp16.")
        return StepResult(loss=float("nan"), skipped=True, more=more)

    def _backward_whole(self, images, texts) -> torch.Tensor:
        with self.autocast():
            out = self.model(images, texts)
            loss = self.loss_fn(*out)
        self.scaler.scale(loss).backward()
        return loss.detach()

    def _backward_accumulated(self, image_chunks, text_chunks) -> torch.Tensor:
        # The patches each image keeps, drawn once: both passes below drop exactly these.
        sizes = [chunk.shape[0] for chunk in image_chunks]
        keep = self.module.patch_keep_indices(sum(sizes), self.device) if self.module.training else None
        kept = keep.split(sizes) if keep is not None else [None] * len(sizes)

        # 1. Features of every micro-batch, no graph; remember each one's random state for the replay.
        rng_states, image_features, text_features = [], [], []
        saved_norms = _batch_norm_buffers(self.module)
        with torch.no_grad(), self.autocast():
            for images, texts, patches in zip(image_chunks, text_chunks, kept):
                rng_states.append(_rng_state(self.device))
                out = self._encode(images, texts, patches)
                image_features.append(out.image_features.float())
                text_features.append(out.text_features.float())
        _restore_batch_norm_buffers(saved_norms)

        # 2. The loss over all local rows, on leaf copies of the features; fills the leaves' grads and
        #    logit_scale/bias grads (local), a chunk of rows at a time.
        image_leaf = torch.cat(image_features).requires_grad_()
        text_leaf = torch.cat(text_features).requires_grad_()
        loss = self.loss_fn.backward_in_chunks(
            image_leaf, text_leaf, self.module.logit_scale.exp(), getattr(self.module, "logit_bias", None),
            chunk_rows=self.cfg.loss_chunk_rows, scale_loss=self.scaler.scale)
        image_grads = image_leaf.grad.split(sizes)
        text_grads = text_leaf.grad.split(sizes)

        # 3. Re-encode each micro-batch with a graph; only the last one lets DDP all-reduce.
        last = len(rng_states) - 1
        for j, (images, texts, patches) in enumerate(zip(image_chunks, text_chunks, kept)):
            sync = contextlib.nullcontext() if j == last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                _set_rng_state(rng_states[j], self.device)
                with self.autocast():
                    out = self._encode(images, texts, patches)
                surrogate = (out.image_features.float() * image_grads[j]).sum() \
                    + (out.text_features.float() * text_grads[j]).sum()
                # Touch the temperature (and bias) so DDP counts them as used and averages their
                # gradients from step 2 with everything else on the last micro-batch.
                surrogate = surrogate + 0.0 * out.logit_scale
                if out.logit_bias is not None:
                    surrogate = surrogate + 0.0 * out.logit_bias
                surrogate.backward()
        return loss

    def _encode(self, images, texts, patches):
        """The (possibly DDP-wrapped, compiled) model; patches to keep only where patch dropout is on,
        so that a model without it runs the very graph of an unaccumulated step."""
        return self.model(images, texts) if patches is None else self.model(images, texts, patches)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
