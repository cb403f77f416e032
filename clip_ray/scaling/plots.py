"""The four scaling plots of a sweep, as PNG files.

Figures use matplotlib's object API on the Agg canvas and never touch pyplot, so
drawing them inside a Ray Tune driver or a test leaves the process's backend and
global figure state alone. Each function returns the path it wrote, or None when
there is nothing to draw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from clip_ray.scaling.fit import PowerLawFit

_DISCRETE_LIMIT = 10  # up to this many distinct colour values get a legend entry each


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    _plain_short_log_axes(figure)
    figure.savefig(path, dpi=110)
    return path


def _new_axes(title: str, x_label: str, y_label: str, log_x: bool = True, log_y: bool = True):
    figure = Figure(figsize=(7, 4.8), layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=x_label, ylabel=y_label,
             xscale="log" if log_x else "linear", yscale="log" if log_y else "linear")
    axes.grid(True, which="both", alpha=0.25)
    return figure, axes


def _plain_short_log_axes(figure: Figure) -> None:
    """On a log y axis spanning little more than a decade, label 4, 6, 0.5 rather than 4x10^0."""
    for axes in figure.axes:
        low, high = axes.get_ylim()
        if axes.get_yscale() == "log" and 0 < low and high / low < 30:
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            axes.yaxis.set_major_formatter(plain)
            axes.yaxis.set_minor_formatter(plain)


class _Colours:
    """Colour per value (a width multiplier, a parameter count): discrete legend or a colour bar."""

    def __init__(self, values: Sequence[float] | None, label: str):
        values = np.asarray([] if values is None else values, dtype=float)
        self.label = label
        self.distinct = np.unique(values[np.isfinite(values)])
        positive = len(self.distinct) and self.distinct.min() > 0
        wide = positive and self.distinct.max() > 20 * self.distinct.min()
        low, high = (self.distinct.min(), self.distinct.max()) if len(self.distinct) else (0.0, 1.0)
        self.norm = LogNorm(low, high) if wide else Normalize(low, high if high > low else low + 1.0)
        self.map = colormaps["viridis"]

    def __call__(self, value: float | None):
        if value is None or not np.isfinite(value) or not len(self.distinct):
            return "tab:blue"
        return self.map(self.norm(value) * 0.9)  # the top of viridis is too pale on white

    def legend_label(self, value: float) -> str:
        return f"{self.label} {value:g}"

    def finish(self, figure: Figure, axes) -> None:
        if 0 < len(self.distinct) <= _DISCRETE_LIMIT:
            handles, labels = axes.get_legend_handles_labels()
            if handles:
                axes.legend(handles, labels, fontsize=8)
        elif len(self.distinct):
            mappable = ScalarMappable(norm=self.norm, cmap=self.map)
            figure.colorbar(mappable, ax=axes, label=self.label)


def plot_error_vs_compute(compute, error, frontier, fit: PowerLawFit | None, path: str | Path,
                          colour_values=None, colour_label: str = "width", y_label: str = "error") -> Path | None:
    """All runs coloured by size, the frontier ringed and joined, the power law with its CI band."""
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    frontier = np.asarray(frontier, dtype=bool)
    shown = np.isfinite(compute) & np.isfinite(error) & (compute > 0) & (error > 0)
    if not shown.any():
        return None
    figure, axes = _new_axes("Error vs compute", "compute C (FLOPs)", y_label)
    colours = _Colours(colour_values, colour_label)
    values = np.full(len(compute), np.nan) if colour_values is None else np.asarray(colour_values, float)
    groups = colours.distinct if 0 < len(colours.distinct) <= _DISCRETE_LIMIT else [None]
    for value in groups:
        members = shown & (values == value if value is not None else True)
        colour = [colours(v) for v in values[members]] if value is None else colours(value)
        axes.scatter(compute[members], error[members], color=colour, s=28, zorder=3,
                     label=colours.legend_label(value) if value is not None else "runs")
    order = np.flatnonzero(frontier & shown)[np.argsort(compute[frontier & shown])]
    axes.plot(compute[order], error[order], color="black", lw=1, ls=":", zorder=2)
    axes.scatter(compute[order], error[order], s=90, facecolors="none", edgecolors="black",
                 zorder=4, label="frontier")
    if fit is not None:
        grid = np.geomspace(compute[shown].min() / 2, compute[shown].max() * 4, 100)
        law = fit.law
        axes.plot(grid, law.predict(grid), color="tab:red", zorder=3,
                  label=f"{law.beta:.3g} C^{law.alpha:.3f}")
        if len(fit.alphas):
            low, high = fit.band(grid)
            axes.fill_between(grid, low, high, color="tab:red", alpha=0.15, lw=0,
                              label=f"{fit.confidence:.0%} bootstrap band")
    colours.finish(figure, axes)
    if not axes.get_legend():
        axes.legend(fontsize=8)
    return _save(figure, path)


def plot_learning_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                         colour_values: Mapping[str, float] | None = None, colour_label: str = "width",
                         x_label: str = "compute (FLOPs)", y_label: str = "error") -> Path | None:
    """One line per trial (trial id -> (x, y)), coloured by its size, on log-log axes."""
    curves = {trial: (np.asarray(x, float), np.asarray(y, float)) for trial, (x, y) in curves.items()}
    curves = {trial: (x[(x > 0) & (y > 0)], y[(x > 0) & (y > 0)]) for trial, (x, y) in curves.items()}
    curves = {trial: xy for trial, xy in curves.items() if len(xy[0])}
    if not curves:
        return None
    colour_values = colour_values or {}
    figure, axes = _new_axes("Learning curves", x_label, y_label)
    colours = _Colours(list(colour_values.values()), colour_label)
    labelled = set()
    for trial, (x, y) in sorted(curves.items()):
        value = colour_values.get(trial)
        label = None
        if value is not None and value not in labelled:
            labelled.add(value)
            label = colours.legend_label(value)
        axes.plot(x, y, color=colours(value), lw=1.2, marker="." if len(x) < 30 else None, label=label)
    colours.finish(figure, axes)
    return _save(figure, path)


def plot_isoflops(profiles: Sequence[dict], path: str | Path, y_label: str = "error") -> Path | None:
    """Error vs model size, one line per compute level; a star at each profile's minimum.

    A minimum at the edge of the sizes sampled is only a bound, so its star is hollow.
    """
    if not profiles:
        return None
    figure, axes = _new_axes("IsoFLOP profiles", "parameters N", y_label)
    colours = _Colours([p["compute"] for p in profiles], "C")
    for profile in profiles:
        colour = colours(profile["compute"])
        axes.plot(profile["params"], profile["error"], color=colour, marker="o", ms=4,
                  label=f"C = {profile['compute']:.2g}")
        minimum = profile["minimum"]
        axes.scatter([minimum["n_opt"]], [minimum["loss"]], marker="*", s=180, zorder=4,
                     color="none" if minimum.get("at_edge") else colour, edgecolors="black")
    if any(p["minimum"].get("at_edge") for p in profiles):
        axes.scatter([], [], marker="*", s=180, color="none", edgecolors="black",
                     label="minimum at the sampled edge (a bound)")
    axes.legend(fontsize=8, title=profiles[0].get("source"), title_fontsize=8)
    return _save(figure, path)


def plot_optimal_size(compute_grid, n_opt_line, minima_compute: Sequence[float], minima_n: Sequence[float],
                      path: str | Path, budget: float | None = None,
                      minima_at_edge: Sequence[bool] | None = None) -> Path | None:
    """Compute-optimal model size: the L(N, D) prediction as a line, IsoFLOP minima as points."""
    if n_opt_line is None and not len(minima_compute):
        return None
    figure, axes = _new_axes("Compute-optimal model size", "compute C (FLOPs)", "optimal parameters N_opt")
    if n_opt_line is not None:
        axes.plot(compute_grid, n_opt_line, color="tab:red", label="from the L(N, D) fit")
    if len(minima_compute):
        at_edge = np.zeros(len(minima_compute), dtype=bool) if minima_at_edge is None else np.asarray(minima_at_edge)
        minima_compute, minima_n = np.asarray(minima_compute, float), np.asarray(minima_n, float)
        axes.scatter(minima_compute[~at_edge], minima_n[~at_edge], color="black", zorder=3,
                     label="IsoFLOP minima")
        if at_edge.any():
            axes.scatter(minima_compute[at_edge], minima_n[at_edge], color="none", edgecolors="black",
                         zorder=3, label="IsoFLOP minima at the sampled edge (bounds)")
    if budget is not None and n_opt_line is not None:
        axes.axvline(budget, color="grey", ls="--", lw=1, label=f"budget {budget:.2g}")
    axes.legend(fontsize=8)
    return _save(figure, path)
