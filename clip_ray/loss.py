"""Contrastive losses over the global batch of all data-parallel workers.

CLIP learns by telling each image's caption apart from every other caption in
the batch, so a bigger batch means more negatives. With N workers the batch
that counts is the concatenation of every worker's slice. Each worker gathers
the others' features (keeping the gradient path back to them) and scores only
its own rows against all columns:

    logits (local_n x global_n) = scale * local features @ gathered features.T

The memory is local x global, not global^2. Every worker's loss is a mean over
its own rows, and the gather's backward sums each feature's gradient over all
workers' losses; once DDP averages parameter gradients across workers the
update is exactly that of one process on the concatenated batch.

Two losses share that machinery:
  ClipLoss    symmetric softmax cross-entropy (Radford et al. 2021)
  SigLipLoss  pairwise sigmoid loss with a learned bias (Zhai et al. 2023)

Both compute in (at least) float32 with autocast switched off, so they are
safe to call inside a bf16/fp16 autocast region.

Gradient accumulation without a smaller contrastive batch (GradCache, Gao et
al. 2021): encode every micro-batch without grad, call the loss once on leaf
copies of the concatenated features and step backward (the gather's backward
gives each local feature its full gradient, whichever rank's loss it came
from), then re-encode each micro-batch with grad and back-propagate its slice
of those feature gradients. tests/test_loss_distributed.py checks this recipe.
`ContrastiveLoss.backward_in_chunks` does the middle part a few rows at a time,
so its peak memory is chunk x global batch rather than local x global.

The ranks' batch shapes are compared once per loss object (an all-gather and a
host sync), not at every step: training batches keep their shape.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------- gathering

# Newer torch renamed the tensor-in, tensor-out collectives and deprecated the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) when there is no group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_equal_batches(local: torch.Tensor, world_size: int) -> None:
    """Every rank must hold the same shape: the labels assume rank * local_n offsets.

    Every rank sees every shape, so all of them raise together instead of one
    rank hanging in the next collective.
    """
    shape = torch.tensor(local.shape, dtype=torch.int64, device=local.device)
    shapes = torch.empty(world_size * shape.numel(), dtype=torch.int64, device=local.device)
    _all_gather_single(shapes, shape)
    shapes = [tuple(s) for s in shapes.view(world_size, -1).tolist()]
    if len(set(shapes)) > 1:
        raise ValueError(
            "contrastive loss needs the same local batch on every rank, got feature shapes "
            + ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            + " (drop the last partial batch or pad it before the loss)"
        )


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the SUM of every rank's gradient for its slice.

    The sum is what makes DDP's later mean come out right: rank r's features
    appear as columns in every rank's loss, so all of those terms belong to them.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        local = local.contiguous()
        gathered = local.new_empty((world_size * local.shape[0], *local.shape[1:]))
        _all_gather_single(gathered, local)
        return gathered

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> torch.Tensor:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        grad_gathered = grad_gathered.contiguous()
        if grad_gathered.is_cuda and "nccl" in str(dist.get_backend()):
            grad_local = grad_gathered.new_empty((grad_gathered.shape[0] // world_size, *grad_gathered.shape[1:]))
            _reduce_scatter_single(grad_local, grad_gathered, op=dist.ReduceOp.SUM)
            return grad_local
        # Gloo has no reduce-scatter: sum everything, keep our own slice.
        summed = grad_gathered.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.chunk(world_size, dim=0)[rank]


def gather_features(local: torch.Tensor, check_shapes: bool = True) -> torch.Tensor:
    """Concatenates every rank's `local` in rank order, differentiably; identity on one process.

    With `check_shapes`, raises ValueError (on every rank) when the ranks' shapes differ.
    """
    _, world_size = rank_and_world()
    if world_size == 1:
        return local
    if check_shapes:
        _check_equal_batches(local, world_size)
    return _GatherWithGrad.apply(local)


# --------------------------------------------------------------------------- losses


class LossOutput(NamedTuple):
    """The loss plus what batch metrics need: image-row logits and each row's matching column."""

    loss: torch.Tensor
    logits_per_image: torch.Tensor  # (rows, columns), float32, already scaled (and biased)
    labels: torch.Tensor  # (rows,) index of each row's own caption among the columns


class ContrastiveLoss(nn.Module):
    """Gathers columns from all ranks, then scores this rank's rows with `local_vs_global`.

    `gather=False` scores the batch as given even when a process group exists,
    e.g. a fixed-batch evaluation loss computed on one rank of a DDP job.
    """

    def __init__(self, gather: bool = True):
        super().__init__()
        self.gather = gather
        self._checked_shape: tuple[int, ...] | None = None  # the local feature shape all ranks agreed on

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> torch.Tensor | LossOutput:
        """Mean loss over this rank's rows against the global batch; `logit_scale` is already exp()'d."""
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must have the same shape")
        rank, image_columns, text_columns = self._columns(image_features, text_features)
        out = self.local_vs_global(image_features, text_features, image_columns, text_columns,
                                   logit_scale, logit_bias, row_offset=rank * image_features.shape[0])
        return out if return_logits else out.loss

    def backward_in_chunks(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        chunk_rows: int | None = None,
        scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    ) -> torch.Tensor:
        """The loss of `forward` and its backward, `chunk_rows` local rows at a time; returns the loss.

        Each chunk's logits (chunk x global) are freed by its own backward. The columns, the
        temperature and the bias enter every chunk as detached leaves that collect their
        gradient; it flows back through the gather (and the exp) once, at the end. The
        gradients are those of `scale_loss(forward(...)).backward()` up to summation order.
        """
        rows = image_features.shape[0]
        chunk_rows = min(chunk_rows or rows, rows)
        rank, image_columns, text_columns = self._columns(image_features, text_features)
        shared = [image_columns, text_columns, logit_scale, logit_bias]
        leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in shared]
        parts = []
        for start in range(0, rows, chunk_rows):
            part = slice(start, start + chunk_rows)
            out = self.local_vs_global(image_features[part], text_features[part], leaves[0], leaves[1],
                                       leaves[2], leaves[3], row_offset=rank * rows + start)
            loss = out.loss * (image_features[part].shape[0] / rows)  # a share of the mean over all rows
            scale_loss(loss).backward()
            parts.append(loss.detach())
        pairs = [(t, leaf.grad) for t, leaf in zip(shared, leaves) if leaf is not None and leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [grad for _, grad in pairs])
        return torch.stack(parts).sum()

    def _columns(self, image_features, text_features):
        """(rank, image columns, text columns) of the global batch; the rows themselves on one process."""
        rank, world_size = rank_and_world() if self.gather else (0, 1)
        if world_size == 1:
            return rank, image_features, text_features
        shape = tuple(image_features.shape)
        if self._checked_shape is None:
            _check_equal_batches(image_features, world_size)  # collective: every rank's first call
            self._checked_shape = shape
        elif shape != self._checked_shape:
            raise ValueError(f"local features changed shape from {self._checked_shape} to {shape} on rank {rank}: "
                             "contrastive training needs the same local batch at every step")
        return (rank, *self.gather_columns(image_features, text_features))

    def gather_columns(self, image_features, text_features):
        return gather_features(image_features, check_shapes=False), gather_features(text_features, check_shapes=False)

    def local_vs_global(
        self,
        image_rows: torch.Tensor,
        text_rows: torch.Tensor,
        image_columns: torch.Tensor,
        text_columns: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        row_offset: int = 0,
    ) -> LossOutput:
        """Loss of these rows vs given (e.g. cached, already gathered) columns, row i pairing column row_offset + i; no communication."""
        raise NotImplementedError


def _fp32(*values):
    """Half-precision tensors become float32 (float64 stays); plain numbers and None pass through."""
    return [v.float() if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16) else v
            for v in values]


class ClipLoss(ContrastiveLoss):
    """Symmetric cross-entropy: each image picks its caption among all captions, and vice versa."""

    def local_vs_global(self, image_rows, text_rows, image_columns, text_columns,
                        logit_scale, logit_bias=None, row_offset=0) -> LossOutput:
        with torch.autocast(device_type=image_rows.device.type, enabled=False):
            image_rows, text_rows, image_columns, text_columns, logit_scale, logit_bias = _fp32(
                image_rows, text_rows, image_columns, text_columns, logit_scale, logit_bias)
            logits_per_image = logit_scale * image_rows @ text_columns.T
            logits_per_text = logit_scale * text_rows @ image_columns.T
            if logit_bias is not None:
                # A shared bias cannot change a softmax; kept so the logits match the model's.
                logits_per_image = logits_per_image + logit_bias
                logits_per_text = logits_per_text + logit_bias
            labels = torch.arange(image_rows.shape[0], device=image_rows.device) + row_offset
            loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return LossOutput(loss, logits_per_image, labels)


class SigLipLoss(ContrastiveLoss):
    """Every (image, caption) pair is its own binary question: match (+1) or not (-1).

    The image rows against all caption columns already cover every pair, so
    only the text features are gathered.
    """

    def gather_columns(self, image_features, text_features):
        return None, gather_features(text_features, check_shapes=False)

    def local_vs_global(self, image_rows, text_rows, image_columns, text_columns,
                        logit_scale, logit_bias=None, row_offset=0) -> LossOutput:
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (build the model with model.init_logit_bias, e.g. -10)")
        with torch.autocast(device_type=image_rows.device.type, enabled=False):
            image_rows, text_columns, logit_scale, logit_bias = _fp32(
                image_rows, text_columns, logit_scale, logit_bias)
            logits = logit_scale * image_rows @ text_columns.T + logit_bias
            rows = image_rows.shape[0]
            labels = torch.arange(rows, device=image_rows.device) + row_offset
            signs = -torch.ones_like(logits)
            signs[torch.arange(rows, device=logits.device), labels] = 1.0
            loss = -F.logsigmoid(signs * logits).sum() / rows
        return LossOutput(loss, logits, labels)


def build_loss(kind: str, gather: bool = True) -> ContrastiveLoss:
    """'clip' or 'siglip' -> the loss module."""
    losses = {"clip": ClipLoss, "siglip": SigLipLoss}
    if kind not in losses:
        raise ValueError(f"unknown loss {kind!r}: expected one of {', '.join(losses)}")
    return losses[kind](gather=gather)
