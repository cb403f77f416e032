"""The precision a model computes in: one autocast rule for training steps and evaluation alike."""

from __future__ import annotations

import contextlib

import torch

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(precision: str, device_type: str) -> contextlib.AbstractContextManager:
    """torch.autocast for "bf16"/"fp16"; a no-op context for "fp32"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"unknown precision {precision!r}: expected 'fp32', 'bf16' or 'fp16'")
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[precision])
