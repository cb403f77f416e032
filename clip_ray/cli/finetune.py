"""clip-ray wise-ft: weight-space ensembles of a model and its fine-tuned version, each evaluated."""

from __future__ import annotations


def add_wise_ft_commands(groups) -> None:
    """Filled in by the WiSE-FT command's module (placeholder while it is written)."""
