"""Linear probe: logistic regression on frozen image features, in the CLIP paper's protocol.

The protocol (Radford et al. 2021, appendix A.3): an L2-regularised multinomial logistic regression,
fitted with scikit-learn's L-BFGS solver (at most 1000 iterations) on the frozen features of a train split.
Its regularisation strength is chosen on a validation part held out of the train split; the model is then
refitted with that strength on the whole train split and scored once on the test split.

Choosing C (sklearn's inverse strength, so a larger C regularises less): the paper's parametric binary
search. A coarse log grid first (DEFAULT_C_GRID: 1e-6 to 1e6, a point every two decades), then rounds
that halve the log step and try the two neighbours of the best C so far, until the step is 1/8 decade:
7 + 8 fits instead of the 97 of a full grid at that resolution. Ties go to the smaller C. Each fit
starts from the solution of the nearest C already fitted (sklearn's warm start), which spares L-BFGS most
of its iterations; the final refit starts cold, so it equals a direct sklearn call with the same C.

k-shot probes take the validation part out of the k examples of each class: a class with n >= 2
examples lends max(1, round(n * val_fraction)) of them (at most n - 1). With one example per class
nothing can be held out, and C falls back to `fallback_c` (1.0): on L2-normalised features and a handful
of rows that regularises strongly, and a strongly regularised probe scores classes by their mean
feature, the usual 1-shot baseline.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from clip_ray.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)

DEFAULT_C_GRID: tuple[float, ...] = tuple(10.0 ** e for e in range(-6, 7, 2))
STEPS_PER_DECADE = 8  # the resolution the binary search refines C to; 0 keeps the coarse grid
FALLBACK_C = 1.0  # C when no validation row can be held out (1-shot)
SELECTION_METRICS = ("top1", "mean_per_class_recall")
# Below this many train values (rows x dim) BLAS threads cost more than they give: on a loaded 2-core machine a
# 240 x 768 fit took 8 s with two OpenBLAS threads and 0.09 s with one. Larger problems keep BLAS's own count.
SINGLE_THREAD_BELOW = 4_000_000


@dataclass
class ProbeResult:
    top1: float
    top5: float
    mean_per_class_recall: float
    c: float  # the chosen C
    val_top1: float  # accuracy of the chosen C on the validation part (nan when C fell back)
    train_count: int  # rows of the train split used (after k-shot selection)
    test_count: int
    num_classes: int = 0  # classes in the union of both splits' labels (or the num_classes given)
    val_count: int = 0  # rows held out of the train split for the sweep
    sweep: dict[float, float] = field(default_factory=dict)  # each C tried -> its validation score
    unconverged_fits: int = 0  # fits that stopped at max_iter (sweep and final refit)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}top1": self.top1, f"{prefix}top5": self.top5,
                f"{prefix}mean_per_class_recall": self.mean_per_class_recall, f"{prefix}c": self.c}


def few_shot_indices(labels: np.ndarray, shots: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of `shots` rows per class, drawn with `seed`; all rows of a class that has fewer."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots={shots!r}: a k-shot probe needs an integer k >= 1")
    labels = _checked_labels(labels, "labels")
    rng = np.random.default_rng(seed)
    chosen, short = [], []
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        if len(rows) < shots:
            short.append(f"{value} ({len(rows)})")
        chosen.append(rng.permutation(rows)[:shots])
    if short:
        log.warning("%d-shot: %d classes have fewer rows and keep all of them: %s%s", shots, len(short),
                    ", ".join(short[:10]), ", ..." if len(short) > 10 else "")
    return np.sort(np.concatenate(chosen))


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, *, c_grid: Sequence[float] = DEFAULT_C_GRID, val_fraction: float = 0.2,
                 seed: int = 0, max_iter: int = 1000, num_classes: int | None = None, shots: int | None = None,
                 steps_per_decade: int = STEPS_PER_DECADE, select_by: str = "top1",
                 fallback_c: float = FALLBACK_C, threads: int | None = None) -> ProbeResult:
    """Sweeps C on a held-out part of the train split, refits on all of it, scores the test split.

    Features are used as given (CLIP's are L2-normalised; no standardisation, as in the paper), only cast
    to float64, the precision sklearn's L-BFGS converges in; fits that still stop at `max_iter` are
    counted in `unconverged_fits` and logged. Labels may be any integers; they are mapped to 0..C-1 in
    sorted order over both splits (or taken as 0..num_classes-1). `shots` first keeps `shots` train rows
    per class (few_shot_indices with `seed`). `select_by` is the validation metric that picks C. `threads` caps
    BLAS/OpenMP threads during the fits; None means one thread for small problems (SINGLE_THREAD_BELOW).
    """
    train_x = _checked_features(train_features, "train_features")
    test_x = _checked_features(test_features, "test_features")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_features have {train_x.shape[1]} dimensions, test_features {test_x.shape[1]}")
    train_y = _checked_labels(train_labels, "train_labels", len(train_x))
    test_y = _checked_labels(test_labels, "test_labels", len(test_x))
    _check_sweep_settings(c_grid, val_fraction, max_iter, select_by, fallback_c)
    classes = _class_values(train_y, test_y, num_classes)
    if shots is not None:
        keep = few_shot_indices(train_y, shots, seed)
        train_x, train_y = train_x[keep], train_y[keep]
    for name, y in (("train_labels", train_y), ("test_labels", test_y)):
        if len(np.unique(y)) < 2:
            raise ValueError(f"{name}: every row is class {y[0]}; a probe needs at least two classes")
    absent = np.setdiff1d(test_y, train_y)
    if len(absent):
        log.warning("linear probe: test classes %s have no train rows and can never be predicted", absent[:10].tolist())
    train_y, test_y = np.searchsorted(classes, train_y), np.searchsorted(classes, test_y)

    if threads is None and train_x.size < SINGLE_THREAD_BELOW:
        threads = 1
    fitter = _Fitter(max_iter)
    with threadpool_limits(limits=threads) if threads else contextlib.nullcontext():
        fit_rows, val_rows = _stratified_split(train_y, val_fraction, seed)
        if len(val_rows):
            sweep = _sweep_c(fitter, train_x[fit_rows], train_y[fit_rows], train_x[val_rows], train_y[val_rows],
                             len(classes), c_grid, steps_per_decade, select_by)
            c = _best_c(sweep.scores)
        else:
            log.info("linear probe: no class has two train rows to hold one out; C falls back to %g", fallback_c)
            sweep, c = _SweepScores(), fallback_c
        test = _scores(fitter.fit(train_x, train_y, c), test_x, test_y, len(classes))
    if fitter.unconverged:
        log.warning("linear probe: %d of %d fits stopped at max_iter=%d before converging",
                    fitter.unconverged, fitter.fits, max_iter)
    return ProbeResult(top1=test["top1"], top5=test["top5"], mean_per_class_recall=test["mean_per_class_recall"],
                       c=c, val_top1=sweep.top1.get(c, math.nan), train_count=len(train_y), test_count=len(test_y),
                       num_classes=len(classes), val_count=len(val_rows), sweep=dict(sweep.scores),
                       unconverged_fits=fitter.unconverged)


def _checked_features(features: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"{name}: expected a non-empty [rows, dim] array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name}: expected numbers, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} rows hold NaN or infinite values "
                         f"(first: row {int(np.argmax(bad))})")
    return x


def _checked_labels(labels: np.ndarray, name: str, rows: int | None = None) -> np.ndarray:
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if y.ndim != 1 or not len(y) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: expected a non-empty 1-D array of integer labels, got {y.dtype} of shape {y.shape}")
    if rows is not None and len(y) != rows:
        raise ValueError(f"{name}: {len(y)} labels for {rows} feature rows")
    return y.astype(np.int64)


def _check_sweep_settings(c_grid: Sequence[float], val_fraction: float, max_iter: int, select_by: str,
                          fallback_c: float) -> None:
    if not len(c_grid) or not all(math.isfinite(c) and c > 0 for c in c_grid):
        raise ValueError(f"c_grid={tuple(c_grid)!r}: needs at least one finite C > 0")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}: must lie strictly between 0 and 1")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r}: must be at least 1")
    if select_by not in SELECTION_METRICS:
        raise ValueError(f"select_by={select_by!r}: one of {', '.join(SELECTION_METRICS)}")
    if not (math.isfinite(fallback_c) and fallback_c > 0):
        raise ValueError(f"fallback_c={fallback_c!r}: must be a finite C > 0")


def _class_values(train_y: np.ndarray, test_y: np.ndarray, num_classes: int | None) -> np.ndarray:
    """The label values, sorted: class i of the probe is the i-th of them."""
    if num_classes is None:
        return np.union1d(train_y, test_y)
    for name, y in (("train_labels", train_y), ("test_labels", test_y)):
        if y.min() < 0 or y.max() >= num_classes:
            raise ValueError(f"{name}: labels run from {y.min()} to {y.max()}, outside 0..{num_classes - 1} "
                             f"(num_classes={num_classes})")
    return np.arange(num_classes)


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): every class with n >= 2 rows lends max(1, round(n * val_fraction)), <= n - 1."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for value in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == value))
        held = 0 if len(rows) < 2 else min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
        val.append(rows[:held])
        fit.append(rows[held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


class _Fitter:
    """Fits LogisticRegression(solver='lbfgs'), optionally from an earlier solution, and counts fits that ran out."""

    def __init__(self, max_iter: int):
        self.max_iter = max_iter
        self.fits = 0
        self.unconverged = 0

    def fit(self, x: np.ndarray, y: np.ndarray, c: float,
            start: LogisticRegression | None = None) -> LogisticRegression:
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=self.max_iter, warm_start=start is not None)
        if start is not None:  # sklearn's warm start reads the previous solution from these attributes
            model.coef_, model.intercept_ = start.coef_.copy(), start.intercept_.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x, y)
        self.fits += 1
        self.unconverged += int(np.max(model.n_iter_) >= self.max_iter)
        return model


def _scores(model: LogisticRegression, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict[str, float]:
    """classification_metrics of the model's class scores; classes it never saw score -inf."""
    logits = np.full((len(x), num_classes), -np.inf)
    logits[:, model.classes_] = model.predict_log_proba(x)
    return classification_metrics(torch.from_numpy(logits), torch.from_numpy(y))


@dataclass
class _SweepScores:
    scores: dict[float, float] = field(default_factory=dict)  # C -> the selection metric on the validation part
    top1: dict[float, float] = field(default_factory=dict)
    models: dict[float, LogisticRegression] = field(default_factory=dict)


def _best_c(scores: dict[float, float]) -> float:
    """The best-scoring C; among equals the smallest (the most regularised)."""
    return max(sorted(scores), key=lambda c: (scores[c], -c))


def _sweep_c(fitter: _Fitter, fit_x: np.ndarray, fit_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
             num_classes: int, c_grid: Sequence[float], steps_per_decade: int, select_by: str) -> _SweepScores:
    """The coarse grid in rising order, then the binary search around the best C (module docstring)."""
    sweep = _SweepScores()

    def score(c: float) -> None:
        if any(math.isclose(c, done, rel_tol=1e-9) for done in sweep.scores):
            return
        nearest = min(sweep.models, key=lambda done: abs(math.log(done / c)), default=None)
        model = fitter.fit(fit_x, fit_y, c, start=sweep.models.get(nearest))
        metrics = _scores(model, val_x, val_y, num_classes)
        sweep.scores[c], sweep.top1[c], sweep.models[c] = metrics[select_by], metrics["top1"], model

    grid = sorted({float(c) for c in c_grid})
    for c in grid:
        score(c)
    if steps_per_decade <= 0 or len(grid) < 2:
        return sweep
    step = max(math.log10(high / low) for low, high in zip(grid, grid[1:]))
    while step / 2 >= 1 / steps_per_decade - 1e-9:
        step /= 2
        best = _best_c(sweep.scores)
        for c in (best * 10 ** -step, best * 10 ** step):
            if grid[0] * (1 - 1e-9) <= c <= grid[-1] * (1 + 1e-9):
                score(c)
    return sweep
