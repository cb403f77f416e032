"""Scaling-law fits recover known laws from synthetic sweeps, and their intervals behave.

Tolerances below were set from the fits' own spread over seeds (see each test),
with room to spare; the data are seeded, so each test is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from clip_ray.scaling.analysis import error_kind, metric_column, to_error
from clip_ray.scaling.extrapolation import extrapolation_check, holdout_mask
from clip_ray.scaling.fit import bootstrap_power_law, fit_power_law, isoflop_minimum, pareto_frontier
from clip_ray.scaling.parametric import (
    ComputeRelation, ParametricLoss, compute_optimal, fit_compute_relation, fit_parametric,
)

ALPHA, BETA = -0.15, 3.0
CHINCHILLA = ParametricLoss(E=1.7, A=400.0, B=410.0, a=0.34, b=0.28)


def power_law_points(n_points: int, noise: float, seed: int = 0):
    compute = np.logspace(15, 20, n_points)
    draws = np.random.default_rng(seed).standard_normal(n_points)
    return compute, BETA * compute**ALPHA * np.exp(noise * draws)


def chinchilla_grid(noise: float, seed: int = 0):
    n, d = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
    n, d = n.ravel(), d.ravel()
    loss = CHINCHILLA.predict(n, d) * np.exp(noise * np.random.default_rng(seed).standard_normal(n.size))
    return n, d, loss


# --------------------------------------------------------------------------- frontier


def test_frontier_keeps_exactly_the_undominated_runs():
    compute = [1.0, 2.0, 2.0, 4.0, 8.0, 8.0, 16.0, 0.5, 32.0]
    error = [5.0, 6.0, 4.0, 4.0, 3.0, 3.0, 3.5, math.nan, 0.0]
    on = pareto_frontier(compute, error)
    # (2, 6) loses to (1, 5); (16, 3.5) to (8, 3); the NaN error and the zero error are unusable;
    # (4, 4) ties (2, 4) without being beaten, and the two (8, 3) runs tie each other: all kept.
    assert on.tolist() == [True, False, True, True, True, True, False, False, False]


def test_frontier_of_runs_at_one_compute_is_the_best_of_them():
    assert pareto_frontier([5.0, 5.0, 5.0], [2.0, 1.0, 3.0]).tolist() == [False, True, False]


# --------------------------------------------------------------------------- power law


def test_power_law_recovers_exponent_and_coefficient_with_noise():
    compute, error = power_law_points(20, noise=0.03)
    fit = bootstrap_power_law(compute, error, n_boot=500, seed=1)
    # over 200 seeds: alpha sd 0.002 (worst 0.006 off), beta sd 8% (worst 27% off)
    assert fit.law.alpha == pytest.approx(ALPHA, abs=0.012)
    assert fit.law.beta == pytest.approx(BETA, rel=0.4)
    low, high = fit.alpha_ci
    assert low < ALPHA < high
    assert fit.beta_ci[0] < BETA < fit.beta_ci[1]
    summary = fit.summary()
    assert summary["n_bootstrap"] == 500 and summary["n_degenerate_resamples"] == 0
    assert low <= summary["alpha_median"] <= high


def test_exact_power_law_is_recovered_exactly():
    compute, error = power_law_points(5, noise=0.0)
    law = fit_power_law(compute, error)
    assert law.alpha == pytest.approx(ALPHA, rel=1e-9) and law.beta == pytest.approx(BETA, rel=1e-9)
    np.testing.assert_allclose(law.predict(compute), error, rtol=1e-9)


def test_interval_shrinks_with_less_noise_and_more_points():
    def width(fit):
        return fit.alpha_ci[1] - fit.alpha_ci[0]

    # The same standard-normal draws at a third of the noise: every resampled slope lands
    # a third as far from the truth, so the interval is exactly a third as wide.
    noisy = bootstrap_power_law(*power_law_points(12, noise=0.03), n_boot=300, seed=2)
    quiet = bootstrap_power_law(*power_law_points(12, noise=0.01), n_boot=300, seed=2)
    assert width(quiet) / width(noisy) == pytest.approx(1 / 3, rel=1e-6)

    few = bootstrap_power_law(*power_law_points(8, noise=0.03, seed=3), n_boot=300, seed=2)
    many = bootstrap_power_law(*power_law_points(64, noise=0.03, seed=3), n_boot=300, seed=2)
    assert width(many) < 0.6 * width(few)  # ~1/sqrt(8) expected


def test_bootstrap_drops_resamples_with_a_single_compute_value():
    fit = bootstrap_power_law([1e15, 1e17], [1.0, 0.5], n_boot=400, seed=0)
    # each resample of two points is degenerate with probability 1/2
    assert 150 < fit.n_degenerate < 250
    assert len(fit.alphas) + fit.n_degenerate == 400
    # two points pin the line: every usable resample is the fit itself
    assert fit.alpha_ci == pytest.approx((fit.law.alpha, fit.law.alpha))
    with pytest.raises(ValueError, match="two runs with distinct"):
        fit_power_law([1e15, 1e15], [1.0, 0.9])


# --------------------------------------------------------------------------- L(N, D) and allocation


def test_parametric_fit_recovers_chinchilla_constants_from_noisy_grid():
    n, d, loss = chinchilla_grid(noise=0.005)
    fit = fit_parametric(n, d, loss)
    law = fit.law
    # seeds 0..4 all land with a, b within 0.01, E within 0.03, A and B within 20%
    assert law.a == pytest.approx(CHINCHILLA.a, abs=0.025)
    assert law.b == pytest.approx(CHINCHILLA.b, abs=0.025)
    assert law.E == pytest.approx(CHINCHILLA.E, abs=0.06)
    assert law.A == pytest.approx(CHINCHILLA.A, rel=0.4)
    assert law.B == pytest.approx(CHINCHILLA.B, rel=0.4)
    assert fit.converged and fit.n_points == 36
    np.testing.assert_allclose(law.predict(n, d), loss, rtol=0.02)

    budget = 1e22
    true_n, true_d = compute_optimal(CHINCHILLA, budget)
    fitted_n, fitted_d = compute_optimal(law, budget)
    assert fitted_n == pytest.approx(true_n, rel=0.15)  # seeds 0..4: within 8%
    assert fitted_d == pytest.approx(true_d, rel=0.15)


def test_parametric_fit_is_exact_on_noiseless_data():
    law = fit_parametric(*chinchilla_grid(noise=0.0), max_starts=8).law
    for name, value in vars(CHINCHILLA).items():
        assert getattr(law, name) == pytest.approx(value, rel=1e-4), name


def test_parametric_fit_refuses_fewer_runs_than_parameters():
    with pytest.raises(ValueError, match="5 parameters"):
        fit_parametric([1e6, 2e6, 4e6, 8e6], [1e7] * 4, [3.0, 2.9, 2.8, 2.7])


def test_compute_optimal_is_chinchillas_closed_form_and_a_true_minimum():
    law, budget = CHINCHILLA, 5.76e23  # Chinchilla's own budget
    g = (law.a * law.A / (law.b * law.B)) ** (1 / (law.a + law.b))
    expected_n = g * (budget / 6) ** (law.b / (law.a + law.b))
    n_opt, d_opt = compute_optimal(law, budget)
    assert n_opt == pytest.approx(expected_n, rel=1e-12)
    assert d_opt == pytest.approx(budget / (6 * n_opt), rel=1e-12)
    # the numeric path with any F(N) agrees, and moving along the budget curve costs loss
    assert compute_optimal(law, budget, lambda n: 2 * n)[0] == pytest.approx(n_opt, rel=1e-5)
    clip_like = ComputeRelation(k=50.0, p=1.05)
    n_clip, d_clip = compute_optimal(law, budget, clip_like)
    assert compute_optimal(law, budget, lambda n: 50.0 * n**1.05)[0] == pytest.approx(n_clip, rel=1e-5)
    assert 3 * clip_like.flops_per_sample(n_clip) * d_clip == pytest.approx(budget, rel=1e-12)
    best = law.predict(n_clip, d_clip)
    for factor in (0.8, 1.25):
        n = n_clip * factor
        assert law.predict(n, clip_like.samples_for(budget, n)) > best


def test_compute_relation_is_fitted_from_measured_flops():
    params = np.array([1e6, 4e6, 1.6e7, 6.4e7])
    relation = fit_compute_relation(params, 50.0 * params**1.05)
    assert relation.k == pytest.approx(50.0, rel=1e-6) and relation.p == pytest.approx(1.05, rel=1e-9)
    single = fit_compute_relation([1e6, 1e6], [3e8, 3e8])
    assert (single.k, single.p) == (pytest.approx(300.0), 1.0)


# --------------------------------------------------------------------------- extrapolation and IsoFLOPs


def test_extrapolation_check_is_exact_on_exact_laws():
    compute, error = power_law_points(10, noise=0.0)
    check = extrapolation_check(compute, error, holdout=0.2)
    assert (check["n_train"], check["n_held_out"]) == (8, 2)
    assert check["power_law"]["mean_abs_relative_error"] < 1e-9

    n, d, loss = chinchilla_grid(noise=0.0)
    relation = ComputeRelation()
    compute = 3 * relation.flops_per_sample(n) * d
    check = extrapolation_check(compute, loss, holdout=1, n=n, d=d, max_starts=8)
    assert check["n_held_out"] == 1
    assert check["parametric"]["mean_abs_relative_error"] < 1e-4


def test_extrapolation_check_sees_a_law_that_bends():
    # an irreducible floor makes the frontier flatten: a power law fitted on the small
    # runs undershoots the large ones, and the check must say so
    compute = np.logspace(15, 21, 12)
    error = 1.0 + 50.0 * compute**-0.1
    check = extrapolation_check(compute, error, holdout=3)
    relative = np.array(check["power_law"]["relative_error"])
    assert np.all(relative < -0.01) and check["power_law"]["mean_abs_relative_error"] > 0.02


def test_holdout_takes_the_largest_compute_with_ties():
    assert holdout_mask([1, 5, 3, 5], 1).tolist() == [False, True, False, True]
    assert holdout_mask(np.arange(10.0), 0.2).sum() == 2
    with pytest.raises(ValueError):
        holdout_mask([1.0, 2.0], 2)


def test_isoflop_minimum_finds_the_vertex_and_flags_edges():
    n = np.array([1e6, 3e6, 1e7, 3e7, 1e8])
    loss = 2.0 + 0.1 * (np.log(n) - np.log(5e6)) ** 2
    minimum = isoflop_minimum(n, loss)
    assert minimum["method"] == "parabola in log N" and not minimum["at_edge"]
    assert minimum["n_opt"] == pytest.approx(5e6, rel=1e-6) and minimum["loss"] == pytest.approx(2.0)
    falling = isoflop_minimum(n, 3.0 - 0.1 * np.log(n))
    assert falling["at_edge"] and falling["n_opt"] == 1e8
    assert isoflop_minimum([1e6, 1e6], [2.0, 1.0]) is None


# --------------------------------------------------------------------------- metrics as errors


def test_metrics_become_errors():
    assert error_kind("val/loss") == "loss" and error_kind("zeroshot/top1") == "accuracy"
    assert error_kind("val/image_to_text_R@5") == "accuracy"
    np.testing.assert_allclose(to_error([0.25, 0.5], "accuracy"), [0.75, 0.5])
    np.testing.assert_allclose(to_error([25.0, 50.0], "accuracy"), [0.75, 0.5])  # percent
    np.testing.assert_allclose(to_error([2.5], "loss"), [2.5])
    with pytest.raises(ValueError):
        error_kind("val/loss", "probability")


def test_metric_names_match_columns_up_to_separators():
    import pandas as pd

    table = pd.DataFrame(columns=["val_loss", "zeroshot_top1", "val/image_to_text_R@5"])
    assert metric_column(table, "val/loss") == "val_loss"
    assert metric_column(table, "zeroshot/top1") == "zeroshot_top1"
    assert metric_column(table, "val/image_to_text_R@5") == "val/image_to_text_R@5"
    with pytest.raises(KeyError, match="no column"):
        metric_column(table, "val/accuracy")
