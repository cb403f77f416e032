"""Scaling-law fits for a sweep: the compute frontier, its power law, and Chinchilla's L(N, D).

Two views of the same sweep, after Cherti et al. 2023 and Hoffmann et al. 2022:

* error = beta * C^alpha, fitted by least squares in log10 space on the Pareto
  frontier (the best error reached at each compute). Bootstrap over frontier
  points gives the confidence intervals; with fewer than ~4 frontier points they
  say little, and the report says so.
* L(N, D) = E + A / N^a + B / D^b over all runs (N parameters, D samples or
  tokens seen), fitted as Chinchilla did: Huber loss (delta 1e-3) on
  log L_pred - log L_obs, L-BFGS from a grid of starting points, the best kept.
  It tells how to split a compute budget between model size and data.

Compute per run is C = 3 * F(N) * D with F the forward FLOPs per sample. For a
language model F(N) = 2N per token, so C = 6ND. A CLIP sample is many image
patches plus a caption, so F is far from 2N; `ComputeRelation` takes
F(N) = k * N^p, fitted on the sweep's measured FLOPs, and the compute-optimal
split keeps a closed form. Only numpy and scipy are used.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize, minimize_scalar

try:  # present wherever scikit-learn is; used only to keep BLAS on one thread during L-BFGS
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - the fit is still right, just slower on a busy machine
    threadpool_limits = None


def _positive_finite(*arrays: np.ndarray) -> np.ndarray:
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
    valid = _positive_finite(compute, error)
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


def _least_squares_lines(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    keep = _positive_finite(compute, error)
    if len(np.unique(compute[keep])) < 2:
        raise ValueError("a power law needs at least two runs with distinct positive compute")
    slope, intercept = _least_squares_lines(np.log10(compute[keep]), np.log10(error[keep]))
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
    keep = _positive_finite(compute, error)
    compute, error = compute[keep], error[keep]
    law = fit_power_law(compute, error)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(compute), size=(n_boot, len(compute)))
    slopes, intercepts = _least_squares_lines(np.log10(compute)[picks], np.log10(error)[picks])
    usable = np.isfinite(slopes)
    return PowerLawFit(law=law, n_points=len(compute), alphas=slopes[usable],
                       log10_betas=intercepts[usable], n_degenerate=int((~usable).sum()),
                       confidence=confidence)


# --------------------------------------------------------------------------- L(N, D)


@dataclass
class ParametricLoss:
    """L(N, D) = E + A / N^a + B / D^b."""

    E: float
    A: float
    B: float
    a: float
    b: float

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.a + self.B / d**self.b


@dataclass
class ParametricFit:
    law: ParametricLoss
    huber_loss: float  # objective at the optimum: mean Huber / delta over points
    n_points: int
    n_starts: int
    converged: bool


def _huber(residual: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber value and derivative; quadratic within delta, linear beyond."""
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta))
    slope = np.where(small, residual, delta * np.sign(residual))
    return value, slope


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber of log residuals over delta; theta = (log A, log B, log E, a, b).

    log L_pred is the log-sum-exp of the three terms' logs, so E, A, B stay positive.
    Dividing by delta keeps the objective near the mean |residual| rather than ~1e-6,
    which L-BFGS's relative stopping rule handles better. Written out by hand: scipy's
    logsumexp costs more than the rest of an evaluation, and the fit runs thousands.
    """
    log_a, log_b, log_e, a, b = theta
    terms = np.stack([log_a - a * log_n, log_b - b * log_d, np.full_like(log_n, log_e)])
    top = terms.max(axis=0)
    exponentials = np.exp(terms - top)
    total = exponentials.sum(axis=0)
    residual = top + np.log(total) - log_loss
    value, slope = _huber(residual, delta)
    weights = exponentials / total * slope  # d(log-sum-exp)/d(term) is the softmax weight
    gradient = np.array([weights[0].sum(), weights[1].sum(), weights[2].sum(),
                         -(weights[0] * log_n).sum(), -(weights[1] * log_d).sum()])
    scale = 1.0 / (delta * len(log_n))
    return value.sum() * scale, gradient * scale


# Chinchilla's grid: a, b in {0, .5, ..., 2}, log A, log B in {0, 5, ..., 25}; log E is
# spread below the lowest observed loss instead of a fixed range, so error-like metrics
# (far below 1) start as well as cross-entropies do.
DEFAULT_EXPONENT_STARTS = (0.0, 0.5, 1.0, 1.5, 2.0)
DEFAULT_LOG_COEFFICIENT_STARTS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
DEFAULT_LOG_E_OFFSETS = (-2.0, -0.5, -0.1)


def _starting_grid(log_loss: np.ndarray, exponents: Sequence[float],
                   log_coefficients: Sequence[float], log_e_offsets: Sequence[float]) -> np.ndarray:
    log_es = [log_loss.min() + offset for offset in log_e_offsets]
    grid = itertools.product(log_coefficients, log_coefficients, log_es, exponents, exponents)
    return np.array(list(grid), dtype=float)


def fit_parametric(n: Sequence[float], d: Sequence[float], loss: Sequence[float], delta: float = 1e-3,
                   exponent_starts: Sequence[float] = DEFAULT_EXPONENT_STARTS,
                   log_coefficient_starts: Sequence[float] = DEFAULT_LOG_COEFFICIENT_STARTS,
                   log_e_offsets: Sequence[float] = DEFAULT_LOG_E_OFFSETS,
                   max_starts: int | None = 64) -> ParametricFit:
    """Fit L(N, D) by L-BFGS-B from the grid of starts; keep the lowest objective.

    The full grid (450 starts by default) is scored in one vectorised pass and
    L-BFGS runs from the `max_starts` best of it (None: all). Starting points far
    from the data's scale almost never win, and the search stays a second or two.
    Exponents are kept in [0, 5]: a negative one would be loss growing with scale.
    """
    n, d, loss = (np.asarray(x, dtype=float) for x in (n, d, loss))
    keep = _positive_finite(n, d, loss)
    log_n, log_d, log_loss = np.log(n[keep]), np.log(d[keep]), np.log(loss[keep])
    if len(log_loss) < 5:
        raise ValueError(f"L(N, D) has 5 parameters; got {len(log_loss)} usable runs")
    starts = _starting_grid(log_loss, exponent_starts, log_coefficient_starts, log_e_offsets)
    if max_starts is not None and len(starts) > max_starts:
        scores = [_objective(theta, log_n, log_d, log_loss, delta)[0] for theta in starts]
        starts = starts[np.argsort(scores, kind="stable")[:max_starts]]
    bounds = [(None, None)] * 3 + [(0.0, 5.0)] * 2
    # L-BFGS-B's inner steps call BLAS on 5-vectors; with OpenBLAS threads on a loaded
    # machine each call waits on idle threads, measured 40x slower (5 ms vs 0.1 ms).
    single_thread = threadpool_limits(limits=1) if threadpool_limits else contextlib.nullcontext()
    best = None
    with single_thread:
        for theta in starts:
            result = minimize(_objective, theta, args=(log_n, log_d, log_loss, delta), jac=True,
                              method="L-BFGS-B", bounds=bounds, options={"maxiter": 1000})
            if best is None or result.fun < best.fun:
                best = result
    log_a, log_b, log_e, a, b = best.x
    law = ParametricLoss(E=math.exp(log_e), A=math.exp(log_a), B=math.exp(log_b), a=a, b=b)
    return ParametricFit(law=law, huber_loss=float(best.fun), n_points=len(log_loss),
                         n_starts=len(starts), converged=bool(best.success))


# --------------------------------------------------------------------------- compute-optimal allocation


@dataclass
class ComputeRelation:
    """Forward FLOPs per sample F(N) = k * N^p, so a run costs C = 3 * k * N^p * D.

    The default (k=2, p=1) is the language-model rule C = 6ND, with D in tokens.
    """

    k: float = 2.0
    p: float = 1.0
    source: str = "C = 6ND"

    def flops_per_sample(self, n) -> np.ndarray:
        return self.k * np.asarray(n, dtype=float) ** self.p

    def samples_for(self, compute, n) -> np.ndarray:
        return np.asarray(compute, dtype=float) / (3.0 * self.flops_per_sample(n))


def fit_compute_relation(params: Sequence[float], flops_per_sample: Sequence[float]) -> ComputeRelation:
    """F(N) = k N^p by least squares in log space; one model size gives p = 1 through its point."""
    params, flops = np.asarray(params, dtype=float), np.asarray(flops_per_sample, dtype=float)
    keep = _positive_finite(params, flops)
    params, flops = params[keep], flops[keep]
    if len(params) == 0:
        raise ValueError("no run has both a parameter count and a FLOP count")
    if len(np.unique(params)) < 2:
        return ComputeRelation(k=float(np.median(flops / params)), p=1.0, source="measured, p fixed at 1")
    slope, intercept = _least_squares_lines(np.log(params), np.log(flops))
    return ComputeRelation(k=float(math.exp(intercept)), p=float(slope), source="fitted to measured FLOPs")


def compute_optimal(law: ParametricLoss, budget: float,
                    relation: ComputeRelation | Callable[[float], float] = ComputeRelation()
                    ) -> tuple[float, float]:
    """(N_opt, D_opt) minimising L(N, D) subject to 3 * F(N) * D = budget.

    For F(N) = k N^p, setting dL/dN = 0 gives the closed form
        N_opt = G * (C / 3k)^(b / (a + p b)),  G = (a A / (p b B))^(1 / (a + p b)),
    which for k=2, p=1 is Chinchilla's N_opt = G (C/6)^(b/(a+b)), D_opt = C / 6N.
    Any other F (a callable N -> forward FLOPs per sample) is solved numerically
    over log N; the loss along the budget curve is then assumed unimodal.
    """
    if isinstance(relation, ComputeRelation):
        k, p = relation.k, relation.p
        exponent_sum = law.a + p * law.b
        if law.a <= 0 or law.b <= 0:
            raise ValueError("a compute-optimal split needs both exponents positive")
        g = (law.a * law.A / (p * law.b * law.B)) ** (1.0 / exponent_sum)
        n_opt = g * (budget / (3.0 * k)) ** (law.b / exponent_sum)
        return float(n_opt), float(relation.samples_for(budget, n_opt))

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        return float(law.predict(n, budget / (3.0 * relation(n))))

    best = minimize_scalar(loss_at, bounds=(0.0, math.log(budget)), method="bounded",
                           options={"xatol": 1e-9})
    n_opt = math.exp(best.x)
    return n_opt, budget / (3.0 * relation(n_opt))


# --------------------------------------------------------------------------- IsoFLOP minima


def isoflop_minimum(n: Sequence[float], loss: Sequence[float]) -> dict | None:
    """Where loss is lowest along one IsoFLOP profile.

    With three or more model sizes a parabola in log N (Chinchilla's approach 2)
    places the minimum between them; if it opens downward or its vertex leaves the
    sampled range, the lowest observed point stands instead. "at_edge" marks a
    minimum at the smallest or largest size sampled: only a bound on the true optimum.
    """
    n, loss = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    keep = _positive_finite(n, loss)
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


# --------------------------------------------------------------------------- extrapolation check


def holdout_mask(compute: Sequence[float], holdout: int | float) -> np.ndarray:
    """The largest-compute runs: the top `holdout` runs (int) or that fraction (float), ties kept together."""
    compute = np.asarray(compute, dtype=float)
    count = holdout if isinstance(holdout, int) else max(1, round(holdout * len(compute)))
    if count < 1 or count >= len(compute):
        raise ValueError(f"cannot hold out {count} of {len(compute)} runs")
    threshold = np.sort(compute)[-count]
    return compute >= threshold


def _relative_errors(predicted: np.ndarray, observed: np.ndarray) -> dict:
    if len(observed) == 0:
        return {"skipped": "no held-out run lies on the frontier of all runs"}
    relative = (predicted - observed) / observed
    return {"predicted": predicted.tolist(), "observed": observed.tolist(),
            "relative_error": relative.tolist(),
            "mean_abs_relative_error": float(np.mean(np.abs(relative)))}


def extrapolation_check(compute: Sequence[float], error: Sequence[float], holdout: int | float = 0.2,
                        n: Sequence[float] | None = None, d: Sequence[float] | None = None,
                        **parametric_options) -> dict:
    """Refit without the largest-compute runs and score the predictions on them.

    The power law describes the frontier, so it is scored on held-out runs that lie
    on the frontier of all runs; L(N, D) predicts every run, so it is scored on all
    held-out runs. Relative error = (predicted - observed) / observed.
    """
    compute, error = np.asarray(compute, dtype=float), np.asarray(error, dtype=float)
    valid = _positive_finite(compute, error)
    compute, error = compute[valid], error[valid]
    held = holdout_mask(compute, holdout)
    report: dict = {"n_train": int((~held).sum()), "n_held_out": int(held.sum()),
                    "compute_threshold": float(compute[held].min())}

    train_frontier = pareto_frontier(compute[~held], error[~held])
    target = held & pareto_frontier(compute, error)
    try:
        law = fit_power_law(compute[~held][train_frontier], error[~held][train_frontier])
        report["power_law"] = {"alpha": law.alpha, "beta": law.beta,
                               **_relative_errors(law.predict(compute[target]), error[target])}
    except ValueError as failure:
        report["power_law"] = {"skipped": str(failure)}

    if n is not None and d is not None:
        n, d = np.asarray(n, dtype=float)[valid], np.asarray(d, dtype=float)[valid]
        try:
            fit = fit_parametric(n[~held], d[~held], error[~held], **parametric_options)
            report["parametric"] = {**vars(fit.law),
                                    **_relative_errors(fit.law.predict(n[held], d[held]), error[held])}
        except ValueError as failure:
            report["parametric"] = {"skipped": str(failure)}
    return report
