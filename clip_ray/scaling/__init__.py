"""Scaling laws from sweeps: compute frontier, power law, Chinchilla L(N, D), plots.

`analyze` is the one entry point a sweep needs; the pieces live in `fit` (frontier and
power law), `parametric` (L(N, D) and the compute-optimal allocation), `extrapolation`
(fit on the smaller runs, predict the largest), all numpy and scipy only, and `plots`
(matplotlib on the Agg canvas).
"""

from clip_ray.scaling.analysis import REPORT_FILE, analyze, format_summary, load_sweep
from clip_ray.scaling.extrapolation import extrapolation_check
from clip_ray.scaling.fit import PowerLaw, bootstrap_power_law, fit_power_law, pareto_frontier
from clip_ray.scaling.parametric import (
    ComputeRelation, ParametricLoss, compute_optimal, fit_compute_relation, fit_parametric,
)

__all__ = [
    "REPORT_FILE", "analyze", "format_summary", "load_sweep",
    "ComputeRelation", "ParametricLoss", "PowerLaw", "bootstrap_power_law", "compute_optimal",
    "extrapolation_check", "fit_compute_relation", "fit_parametric", "fit_power_law", "pareto_frontier",
]
