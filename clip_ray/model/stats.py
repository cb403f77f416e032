"""Parameter and FLOP counts of a model config, for sweeps and scaling-law fits.

FLOPs are measured, not estimated: the model is built on the meta device (no
memory, no arithmetic) and one forward pass per tower runs under
`torch.utils.flop_counter.FlopCounterMode`. The counter reports 2 FLOPs per
multiply-accumulate of every matmul, convolution and attention (on meta,
scaled_dot_product_attention runs as its two batched matmuls and so is
counted; causal attention is counted as full). Norms, activations and
softmax are not counted; they are a few percent at most.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from clip_ray.config import ModelConfig
from clip_ray.model.clip import build_model


def _forward_flops(fn, *inputs: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops()


def model_stats(config: ModelConfig) -> dict[str, int]:
    """Parameters per tower and forward FLOPs for one image and one caption padded to context_length.

    The model runs in eval mode, so patch dropout is off: a training step with
    patch dropout p spends about (1 - p) of `flops_image` in the image tower.
    """
    model = build_model(config, device="meta").eval()
    params_vision = sum(p.numel() for p in model.visual.parameters())
    params_total = sum(p.numel() for p in model.parameters())
    temperature = sum(p.numel() for p in (model.logit_scale, model.logit_bias) if p is not None)

    size = config.vision.image_size
    images = torch.zeros(1, 3, size, size, device="meta")
    tokens = torch.zeros(1, config.text.context_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        flops_image = _forward_flops(model.encode_image, images)
        flops_text = _forward_flops(model.encode_text, tokens)
    return {
        "params_vision": params_vision,
        "params_text": params_total - params_vision - temperature,
        "params_total": params_total,
        "flops_image": flops_image,
        "flops_text": flops_text,
        "flops_per_sample": flops_image + flops_text,
    }
