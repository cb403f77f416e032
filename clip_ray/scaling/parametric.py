"""Chinchilla's L(N, D) over all runs of a sweep, and the compute-optimal split it implies.

L(N, D) = E + A / N^a + B / D^b (N parameters, D samples or tokens seen),
fitted as Hoffmann et al. 2022 did: Huber loss (delta 1e-3) on
log L_pred - log L_obs, L-BFGS from a grid of starting points, the best kept.
It tells how to split a compute budget between model size and data.

Compute per run is C = 3 * F(N) * D with F the forward FLOPs per sample. For a
language model F(N) = 2N per token, so C = 6ND. A CLIP sample is many image
patches plus a caption, so F is far from 2N; `ComputeRelation` takes
F(N) = k * N^p, fitted on the sweep's measured FLOPs, and the compute-optimal
split keeps a closed form.

Apart from clip_ray.scaling.fit because it is a different model of the sweep
(all runs, two variables, a non-convex fit) from the frontier's power law.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from clip_ray.scaling.fit import least_squares_lines, positive_finite

try:  # present wherever scikit-learn is; used only to keep BLAS on one thread during L-BFGS
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - the fit is still right, just slower on a busy machine
    threadpool_limits = None


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
    keep = positive_finite(n, d, loss)
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
    keep = positive_finite(params, flops)
    params, flops = params[keep], flops[keep]
    if len(params) == 0:
        raise ValueError("no run has both a parameter count and a FLOP count")
    if len(np.unique(params)) < 2:
        return ComputeRelation(k=float(np.median(flops / params)), p=1.0, source="measured, p fixed at 1")
    slope, intercept = least_squares_lines(np.log(params), np.log(flops))
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
