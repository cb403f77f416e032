"""A CLIP's two towers as ONNX graphs, each checked with onnxruntime against PyTorch before it counts.

    image_encoder.onnx   images  float32 [N, 3, S, S] (preprocessed: resized, cropped, normalised)
                         -> image_features float32 [N, embed_dim], unit norm
    text_encoder.onnx    tokens  int64 [N, context_length] (the model's tokenizer, padded with its pad id)
                         -> text_features float32 [N, embed_dim], unit norm

N is dynamic. torch.onnx's dynamo exporter (torch.export, then onnxscript) writes them; it runs offline.
The graphs compute in float32 whatever dtype the weight files of the other formats use: onnxruntime's CPU
kernels are float32 ones, and a user can convert a graph to float16 with onnxruntime's tools.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clip_ray.model.tokenizer import Tokenizer

log = logging.getLogger("clip_ray.driver.export")

IMAGE_ENCODER_FILE = "image_encoder.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
DEFAULT_TOLERANCE = 1e-4  # max abs difference of unit-norm features, float32
# protobuf cannot hold a graph over 2 GiB: bigger weights go to a .data file beside it.
_SINGLE_FILE_LIMIT = 1_800_000_000
_CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")
# What the text graph is checked on: ordinary captions, an empty one and one cut at the context length.
CHECK_CAPTIONS = ("a dog runs across the grass .", "Two children play football on a beach at sunset !", "",
                  "a man in a red jacket climbs a steep rock face " * 8)


class TowerEncoder(nn.Module):
    """One tower of a CLIP as a module of its own: forward is the CLIP's `encode_image` or `encode_text`."""

    def __init__(self, clip: nn.Module, method: str):
        super().__init__()
        self.clip = clip
        self.method = method

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.clip, self.method)(inputs)


class OnnxMismatch(RuntimeError):
    """onnxruntime's features differ from PyTorch's by more than the tolerance."""


@dataclass
class GraphCheck:
    """How one graph's onnxruntime output compared with PyTorch's on the check batch."""

    file: str
    input: str
    batch: int
    max_abs_diff: float
    opset: int

    def as_dict(self) -> dict:
        return {"file": self.file, "input": self.input, "batch": self.batch, "max_abs_diff": self.max_abs_diff,
                "opset": self.opset}


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's graph passes log every step at INFO (hundreds of lines for a small model)."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _export_graph(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
                  output_name: str) -> list[Path]:
    """Writes one graph with a dynamic batch; returns its files (the graph, and its weights when external)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > _SINGLE_FILE_LIMIT
    batch = torch.export.Dim("batch", min=1)
    with _quiet_exporter():
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_shapes=({0: batch},), dynamo=True, external_data=external, verbose=False)
    return [path, *([path.with_name(path.name + ".data")] if external else [])]


def _max_abs_diff(path: Path, input_name: str, inputs: torch.Tensor, expected: torch.Tensor) -> float:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {input_name: inputs.numpy()})
    if actual.shape != tuple(expected.shape):
        raise OnnxMismatch(f"{path.name}: onnxruntime gave shape {actual.shape}, PyTorch {tuple(expected.shape)}")
    return float(np.abs(actual - expected.numpy()).max())


def _opset(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))


def check_images(image_size: int, count: int = 3, seed: int = 0) -> torch.Tensor:
    """A reproducible batch shaped like preprocessed images (about unit variance, as normalised pixels are)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, image_size, image_size, generator=generator)


@torch.no_grad()
def export_onnx(model: nn.Module, tokenizer: Tokenizer, folder: str | Path, *, tolerance: float = DEFAULT_TOLERANCE,
                images: torch.Tensor | None = None) -> tuple[list[Path], list[GraphCheck]]:
    """Writes both graphs into `folder` and checks each on a batch of another size than the one it was traced
    with (`images`, default `check_images`; CHECK_CAPTIONS through `tokenizer`); raises OnnxMismatch above
    `tolerance`. Returns (files, checks)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    size = model.config.vision.image_size
    images = check_images(size) if images is None else images.float()
    tokens = tokenizer(list(CHECK_CAPTIONS), context_length=model.config.text.context_length)
    files, checks = [], []
    for module, inputs, name, input_name, output_name in (
            (TowerEncoder(model, "encode_image"), images, IMAGE_ENCODER_FILE, "images", "image_features"),
            (TowerEncoder(model, "encode_text"), tokens, TEXT_ENCODER_FILE, "tokens", "text_features")):
        module.eval()
        # Traced on two rows (torch.export would fix a batch of one), checked on all of them.
        files += _export_graph(module, inputs[:2].clone(), folder / name, input_name, output_name)
        difference = _max_abs_diff(folder / name, input_name, inputs, module(inputs))
        checks.append(GraphCheck(name, input_name, len(inputs), difference, _opset(folder / name)))
        log.info("%s: onnxruntime vs PyTorch on %d rows: max abs difference %.3g", name, len(inputs), difference)
        if not difference <= tolerance:  # also catches NaN
            raise OnnxMismatch(f"{name}: onnxruntime's features differ from PyTorch's by {difference:.3g} "
                               f"(tolerance {tolerance:g}) on {len(inputs)} rows")
    return files, checks
