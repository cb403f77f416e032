"""clip-ray export: a trained model out to OpenCLIP, Hugging Face transformers, ONNX or plain safetensors."""

from __future__ import annotations


def add_export_commands(groups) -> None:
    """Filled in by the export command's module (placeholder while it is written)."""
