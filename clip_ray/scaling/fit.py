"""Scaling-law fits for a sweep: the compute frontier and its power law, and IsoFLOP minima.

After Cherti et al. 2023: error = beta * C^alpha, fitted by least squares in
log10 space on the Pareto frontier (the best error reached at each compute).
Bootstrap over frontier points gives the confidence intervals; with fewer than
~4 frontier points they say little, and the report says so.

The other view of the same sweep, Chinchilla's L(N, D) and the compute-optimal
split it implies, is in clip_ray.scaling.parametric; how well either extrapolates
is clip_ray.scaling.extrapolation's. Only numpy and scipy are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def positive_finite(*arrays: np.ndarray) -> np.ndarray:
    """Mask of the runs every fit can use: each value finite and positive, since all fits work in log space."""
    mask = np.ones(len(arrays[0]), dtype=bool)
    for array in arrays:
        mask &= np.isfinite(array) & (array > 0)
    return mask


# --------------------------------------------------------------------------- frontier


def pareto_frontier(compute: Sequence[float], error: Sequence[float]) -> np.ndarray:
    """Boolean mask of runs that no other run beats: none has lower-or-equal compute and lower error.

    Runs with a missing or non-positive compute or error are never on the frontier.
    """
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    valid = positive_finite(compute, error)
    on_frontier = np.zeros(len(compute), dtype=bool)
    order = np.flatnonzero(valid)[np.argsort(compute[valid], kind="stable")]
    best_so_far = math.inf  # lowest error among runs with strictly less compute
    for c in np.unique(compute[order]):
        group = order[compute[order] == c]
        best_here = min(best_so_far, error[group].min())
        on_frontier[group] = error[group] <= best_here
        best_so_far = best_here
    return on_frontier


# --------------------------------------------------------------------------- power law on the frontier


@dataclass
class PowerLaw:
    """error = beta * C^alpha (alpha < 0 when error falls with compute)."""

    alpha: float
    beta: float

    def predict(self, compute) -> np.ndarray:
        return self.beta * np.asarray(compute, dtype=float) ** self.alpha


def least_squares_lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slope and intercept of y ~ x along the last axis; NaN where x has no spread."""
    x_centred = x - x.mean(axis=-1, keepdims=True)
    spread = (x_centred**2).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = (x_centred * y).sum(axis=-1) / spread
    slope = np.where(spread > 1e-12 * x.shape[-1], slope, np.nan)
    intercept = y.mean(axis=-1) - slope * x.mean(axis=-1)
    return slope, intercept


def fit_power_law(compute: Sequence[float], error: Sequence[float]) -> PowerLaw:
    """Least squares of log10(error) on log10(C); needs two distinct positive C."""
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    keep = positive_finite(compute, error)
    if len(np.unique(compute[keep])) < 2:
        raise ValueError("a power law needs at least two runs with distinct positive compute")
    slope, intercept = least_squares_lines(np.log10(compute[keep]), np.log10(error[keep]))
    return PowerLaw(alpha=float(slope), beta=float(10.0**intercept))


@dataclass
class PowerLawFit:
    """The fit on all frontier points plus the bootstrap spread of (alpha, log10 beta)."""

    law: PowerLaw
    n_points: int
    alphas: np.ndarray = field(repr=False)  # one per usable resample
    log10_betas: np.ndarray = field(repr=False)
    n_degenerate: int  # resamples with fewer than two distinct C, dropped
    confidence: float

    def _interval(self, values: np.ndarray) -> tuple[float, float]:
        tail = 50.0 * (1.0 - self.confidence)
        low, high = np.percentile(values, [tail, 100.0 - tail])
        return float(low), float(high)

    @property
    def alpha_ci(self) -> tuple[float, float]:
        return self._interval(self.alphas)

    @property
    def beta_ci(self) -> tuple[float, float]:
        low, high = self._interval(self.log10_betas)
        return 10.0**low, 10.0**high

    def band(self, compute) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise confidence band of the predicted error over `compute`."""
        log_c = np.log10(np.asarray(compute, dtype=float))
        predictions = self.log10_betas[:, None] + self.alphas[:, None] * log_c[None, :]
        tail = 50.0 * (1.0 - self.confidence)
        low, high = np.percentile(predictions, [tail, 100.0 - tail], axis=0)
        return 10.0**low, 10.0**high

    def summary(self) -> dict:
        return {
            "alpha": self.law.alpha,
            "beta": self.law.beta,
            "alpha_median": float(np.median(self.alphas)),
            "beta_median": float(10.0 ** np.median(self.log10_betas)),
            "alpha_ci": list(self.alpha_ci),
            "beta_ci": list(self.beta_ci),
            "confidence": self.confidence,
            "n_points": self.n_points,
            "n_bootstrap": len(self.alphas),
            "n_degenerate_resamples": self.n_degenerate,
        }


def bootstrap_power_law(compute: Sequence[float], error: Sequence[float], n_boot: int = 1000,
                        seed: int = 0, confidence: float = 0.95) -> PowerLawFit:
    """Fit the power law and resample the points with replacement `n_boot` times.

    Pass the frontier points only. A resample that draws a single compute value
    has no slope; it is dropped and counted. With exactly two points the interval
    collapses onto the fit itself: two points pin a line and say nothing about noise.
    """
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    keep = positive_finite(compute, error)
    compute, error = compute[keep], error[keep]
    law = fit_power_law(compute, error)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(compute), size=(n_boot, len(compute)))
    slopes, intercepts = least_squares_lines(np.log10(compute)[picks], np.log10(error)[picks])
    usable = np.isfinite(slopes)
    return PowerLawFit(law=law, n_points=len(compute), alphas=slopes[usable],
                       log10_betas=intercepts[usable], n_degenerate=int((~usable).sum()),
                       confidence=confidence)


# --------------------------------------------------------------------------- IsoFLOP minima


def isoflop_minimum(n: Sequence[float], loss: Sequence[float]) -> dict | None:
    """Where loss is lowest along one IsoFLOP profile.

    With three or more model sizes a parabola in log N (Chinchilla's approach 2)
    places the minimum between them; if it opens downward or its vertex leaves the
    sampled range, the lowest observed point stands instead. "at_edge" marks a
    minimum at the smallest or largest size sampled: only a bound on the true optimum.
    """
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    keep = positive_finite(n, loss)
    n, loss = n[keep], loss[keep]
    if len(np.unique(n)) < 2:
        return None
    lowest = int(np.argmin(loss))
    result = {"n_opt": float(n[lowest]), "loss": float(loss[lowest]), "method": "lowest point",
              "at_edge": bool(n[lowest] in (n.min(), n.max()))}
    if len(np.unique(n)) >= 3:
        curvature, slope, offset = np.polyfit(np.log(n), loss, 2)
        if curvature > 0:
            vertex = -slope / (2.0 * curvature)
            if np.log(n).min() <= vertex <= np.log(n).max():
                result = {"n_opt": float(math.exp(vertex)),
                          "loss": float(np.polyval([curvature, slope, offset], vertex)),
                          "method": "parabola in log N", "at_edge": False}
    return result
