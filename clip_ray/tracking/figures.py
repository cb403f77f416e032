"""Training curves as PNG files, drawn from the metric history the tracker keeps locally.

The MLflow UI draws curves too, but a PNG travels with the run's artifacts
(reports, a registry entry, a server that was down all along) and needs no UI.
Figures are built with matplotlib's object API on the Agg canvas, so importing
this module never switches the process's pyplot backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# metric name -> [(step, value), ...] in the order they were logged
History = Mapping[str, Sequence[tuple[int, float]]]

_MAX_COLUMNS = 3


def metric_group(name: str) -> str:
    """"train/loss" -> "train"; names without a slash share the group "metrics"."""
    return name.split("/", 1)[0] if "/" in name else "metrics"


def _finite_points(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    # A skipped (non-finite) step would squash the whole axis; the gap in the line shows it instead.
    kept = [(step, value) for step, value in sorted(points) if math.isfinite(value)]
    return [step for step, _ in kept], [value for _, value in kept]


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


def plot_losses(history: History, path: str | Path) -> Path | None:
    """Every metric whose last name part mentions "loss" on one axis, so train and val compare."""
    names = sorted(name for name in history if "loss" in name.rsplit("/", 1)[-1])
    curves = {name: _finite_points(history[name]) for name in names}
    curves = {name: curve for name, curve in curves.items() if curve[0]}
    if not curves:
        return None
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for name, (steps, values) in curves.items():
        axes.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
    everything = [v for _, values in curves.values() for v in values]
    if min(everything) > 0 and max(everything) > 10 * min(everything):  # a loss that fell by decades
        axes.set_yscale("log")
    axes.set(xlabel="step", ylabel="loss", title="Loss")
    axes.grid(True, alpha=0.3)
    axes.legend()
    return _save(figure, Path(path))


def plot_group(history: History, names: Sequence[str], title: str, path: str | Path) -> Path | None:
    """One small panel per metric, in a grid of up to three columns."""
    curves = {name: _finite_points(history[name]) for name in sorted(names)}
    curves = {name: curve for name, curve in curves.items() if curve[0]}
    if not curves:
        return None
    columns = min(_MAX_COLUMNS, len(curves))
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    figure.suptitle(title)
    for index, (name, (steps, values)) in enumerate(curves.items()):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.plot(steps, values, marker="." if len(steps) < 30 else None)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("step", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(True, alpha=0.3)
    return _save(figure, Path(path))


def plot_history(history: History, out_dir: str | Path) -> list[Path]:
    """loss.png plus one curves_<group>.png per metric group; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_losses(history, out_dir / "loss.png")]
    groups: dict[str, list[str]] = {}
    for name in history:
        groups.setdefault(metric_group(name), []).append(name)
    for group, names in sorted(groups.items()):
        file_name = "curves_" + re.sub(r"[^\w.-]", "_", group) + ".png"
        written.append(plot_group(history, names, group, out_dir / file_name))
    return [path for path in written if path is not None]
