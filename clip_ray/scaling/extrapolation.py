"""How well the sweep's fits extrapolate: refit without the largest-compute runs, predict those.

A scaling law is only worth what it predicts beyond the data it was fitted on,
so this scores both fits (the frontier's power law from clip_ray.scaling.fit and
L(N, D) from clip_ray.scaling.parametric) on the runs they did not see.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clip_ray.scaling.fit import fit_power_law, pareto_frontier, positive_finite
from clip_ray.scaling.parametric import fit_parametric


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
    valid = positive_finite(compute, error)
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
