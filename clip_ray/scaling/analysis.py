"""From a sweep's results table to fits, plots and a JSON report, in one call.

`tune/sweep.py` calls `analyze` when a sweep ends and logs the PNGs to the sweep's
MLflow parent run; `tune/analyze.py` calls it on a finished sweep or any CSV.

Tables (one row per trial; what the sweep writes):
  results  trial_id, width_multiplier, params, params_vision, params_text,
           flops_per_sample (forward), samples_seen, unique_samples,
           compute (= 3 * flops_per_sample * samples_seen), val_loss, zeroshot_top1,
           retrieval columns such as "val/image_to_text_R@5", wall_time_s
  curves   long format: trial_id, step, samples_seen, metric, value
A sweep directory holds results.parquet or results.csv, and optionally curves.parquet
or curves.csv.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from clip_ray.scaling import plots
from clip_ray.scaling.extrapolation import extrapolation_check
from clip_ray.scaling.fit import bootstrap_power_law, fit_power_law, isoflop_minimum, pareto_frontier
from clip_ray.scaling.parametric import ComputeRelation, compute_optimal, fit_compute_relation, fit_parametric

REPORT_FILE = "scaling_fit.json"


# --------------------------------------------------------------------------- tables


def _slug(name: str) -> str:
    """"val/loss", "val_loss" and "Val Loss" name the same metric."""
    return re.sub(r"[^0-9a-z@]+", "_", name.lower()).strip("_")


def read_table(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def load_sweep(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(results, curves or None) from a results file or a sweep directory."""
    path = Path(path)
    if path.is_file():
        return read_table(path), None

    def first(*names: str) -> Path | None:
        return next((path / name for name in names if (path / name).is_file()), None)

    results = first("results.parquet", "results.csv")
    if results is None:
        raise FileNotFoundError(f"{path} holds no results.parquet or results.csv")
    curves = first("curves.parquet", "curves.csv")
    return read_table(results), read_table(curves) if curves else None


def metric_column(table: pd.DataFrame, metric: str) -> str:
    """The column holding `metric`, matching names up to case and separators."""
    if metric in table.columns:
        return metric
    matches = [column for column in table.columns if _slug(str(column)) == _slug(metric)]
    if not matches:
        raise KeyError(f"no column for metric {metric!r}; columns: {list(table.columns)}")
    return matches[0]


def error_kind(metric: str, error_from: str = "auto") -> str:
    """"loss" (the value is the error) or "accuracy" (error = 1 - value); auto reads the name."""
    if error_from == "auto":
        return "loss" if "loss" in metric.lower() else "accuracy"
    if error_from not in ("loss", "accuracy"):
        raise ValueError(f"error_from must be auto, loss or accuracy, not {error_from!r}")
    return error_from


def to_error(values, kind: str) -> np.ndarray:
    """Lower is better; accuracies given in percent (any value above 1) are read as such."""
    values = np.asarray(values, dtype=float)
    if kind == "loss":
        return values
    scale = 100.0 if np.nanmax(values, initial=0.0) > 1.0 else 1.0
    return 1.0 - values / scale


def _trial_table(results: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    table = pd.DataFrame(results).copy()
    if "trial_id" not in table.columns:
        table["trial_id"] = [f"trial_{i}" for i in range(len(table))]
    table["trial_id"] = table["trial_id"].astype(str)
    if "compute" not in table.columns:
        if not {"flops_per_sample", "samples_seen"} <= set(table.columns):
            raise KeyError("results need a compute column, or flops_per_sample and samples_seen")
        table["compute"] = 3.0 * table["flops_per_sample"] * table["samples_seen"]
    return table


def _curve_points(curves: pd.DataFrame, trials: pd.DataFrame, metric: str, kind: str) -> pd.DataFrame:
    """The learning curves of `metric`, each point with the compute spent so far and its trial's size."""
    rows = curves[curves["metric"].astype(str).map(_slug) == _slug(metric)].copy()
    rows["trial_id"] = rows["trial_id"].astype(str)
    rows["error"] = to_error(rows["value"], kind)
    columns = ["trial_id"] + [c for c in ("params", "flops_per_sample", "width_multiplier") if c in trials]
    rows = rows.merge(trials[columns], on="trial_id", how="inner")
    if "flops_per_sample" in rows:
        rows["compute"] = 3.0 * rows["flops_per_sample"] * rows["samples_seen"]
    return rows.sort_values(["trial_id", "samples_seen"])


# --------------------------------------------------------------------------- IsoFLOP profiles


def isoflop_profiles(trials: pd.DataFrame, points: pd.DataFrame | None, n_levels: int = 6) -> list[dict]:
    """Error against model size at a few fixed compute levels, with each profile's minimum.

    From learning curves: every trial's curve is interpolated (log-log, never
    extrapolated) at geometrically spaced compute levels. Without curves the final
    results are binned by log compute, so "fixed" then means within one bin.
    """
    use_curves = points is not None and "compute" in points and len(points) > 0
    source = points if use_curves else trials
    compute = source["compute"].to_numpy(float)
    compute = compute[np.isfinite(compute) & (compute > 0)]
    if len(compute) < 2 or compute.min() == compute.max():
        return []
    edges = np.geomspace(compute.min(), compute.max(), n_levels + 1)
    levels = np.sqrt(edges[:-1] * edges[1:])
    profiles = []
    for index, level in enumerate(levels):
        params, errors = [], []
        if use_curves:
            for _, curve in points.groupby("trial_id"):
                c, e = curve["compute"].to_numpy(float), curve["error"].to_numpy(float)
                c, e = c[c > 0], e[c > 0]  # the evaluation before the first step has spent nothing
                if len(c) and c.min() <= level <= c.max() and np.all(e > 0):
                    params.append(float(curve["params"].iloc[0]))
                    errors.append(float(np.exp(np.interp(np.log(level), np.log(c), np.log(e)))))
        else:
            inside = (trials["compute"] >= edges[index]) & (trials["compute"] <= edges[index + 1])
            params, errors = trials.loc[inside, "params"].tolist(), trials.loc[inside, "error"].tolist()
        minimum = isoflop_minimum(params, errors)
        if minimum is not None:
            order = np.argsort(params)
            profiles.append({"compute": float(level), "params": np.asarray(params)[order].tolist(),
                             "error": np.asarray(errors)[order].tolist(), "minimum": minimum,
                             "source": "learning curves" if use_curves else "final results, binned"})
    return profiles


# --------------------------------------------------------------------------- the analysis


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def analyze(results: pd.DataFrame | Sequence[dict], out_dir: str | Path, metric: str = "val_loss",
            error_from: str = "auto", budget: float | None = None, curves: pd.DataFrame | None = None,
            n_boot: int = 1000, seed: int = 0, holdout: int | float = 0.2,
            data_column: str = "samples_seen", parametric_options: dict | None = None) -> dict:
    """Frontier, power law with bootstrap CIs, L(N, D), allocation, extrapolation check, plots.

    Writes `scaling_fit.json` and the PNGs into `out_dir` and returns the same report
    (plus "plots": name -> path). A part that the data cannot support (too few runs)
    is reported as {"skipped": reason} instead of failing the whole analysis.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parametric_options = parametric_options or {}
    trials = _trial_table(results)
    kind = error_kind(metric, error_from)
    trials["error"] = to_error(trials[metric_column(trials, metric)], kind)
    usable = trials[np.isfinite(trials["error"]) & (trials["error"] > 0)
                    & np.isfinite(trials["compute"]) & (trials["compute"] > 0)].reset_index(drop=True)
    if usable.empty:
        raise ValueError(f"no trial has a positive, finite compute and {metric} error")
    compute, error = usable["compute"].to_numpy(float), usable["error"].to_numpy(float)
    frontier = pareto_frontier(compute, error)
    report: dict = {"metric": metric, "error": "value" if kind == "loss" else "1 - value",
                    "n_trials": len(trials), "n_usable": len(usable),
                    "frontier_trials": usable.loc[frontier, "trial_id"].tolist()}

    power_fit = None
    try:
        power_fit = bootstrap_power_law(compute[frontier], error[frontier], n_boot=n_boot, seed=seed)
        report["power_law"] = power_fit.summary()
    except ValueError as failure:
        report["power_law"] = {"skipped": str(failure)}

    has_sizes = {"params", data_column} <= set(usable.columns)
    relation = ComputeRelation()
    if "params" in usable and "flops_per_sample" in usable:
        relation = fit_compute_relation(usable["params"], usable["flops_per_sample"])
    report["compute_relation"] = {"k": relation.k, "p": relation.p, "source": relation.source,
                                  "formula": "C = 3 * k * N^p * D"}
    parametric = None
    if has_sizes:
        try:
            parametric = fit_parametric(usable["params"], usable[data_column], error, **parametric_options)
            law = parametric.law
            report["parametric"] = {**{k: float(v) for k, v in vars(law).items()},
                                    "huber_loss": parametric.huber_loss, "n_points": parametric.n_points,
                                    "n_starts": parametric.n_starts, "converged": parametric.converged,
                                    "data_column": data_column,
                                    "n_opt_exponent": law.b / (law.a + relation.p * law.b)}
        except ValueError as failure:
            report["parametric"] = {"skipped": str(failure)}

    points = _curve_points(curves, usable, metric, kind) if curves is not None and "params" in usable else None
    profiles = isoflop_profiles(usable, points) if "params" in usable else []
    report["isoflop"] = profiles
    interior = [p for p in profiles if not p["minimum"]["at_edge"]]  # edge minima are only bounds
    minima_c = [p["compute"] for p in interior]
    minima_n = [p["minimum"]["n_opt"] for p in interior]
    if len(set(minima_c)) >= 2:
        report["isoflop_n_opt_exponent"] = fit_power_law(minima_c, minima_n).alpha

    if budget is not None:
        report["budget"] = _budget_report(budget, power_fit, parametric, relation, compute.max())

    try:
        report["extrapolation"] = extrapolation_check(
            compute, error, holdout,
            n=usable["params"] if has_sizes else None, d=usable[data_column] if has_sizes else None,
            **parametric_options)
    except ValueError as failure:
        report["extrapolation"] = {"skipped": str(failure)}

    report["plots"] = _draw(out_dir, usable, frontier, power_fit, points, profiles, parametric,
                            relation, budget, metric_label=metric if kind == "loss" else f"1 - {metric}")
    json_path = out_dir / REPORT_FILE
    json_path.write_text(json.dumps(report, indent=2, default=_json_default))
    report["json"] = str(json_path)
    return report


def _budget_report(budget: float, power_fit, parametric, relation: ComputeRelation,
                   largest_compute: float) -> dict:
    result: dict = {"compute": budget, "times_largest_run": budget / largest_compute}
    if power_fit is not None:
        result["frontier_error"] = float(power_fit.law.predict(budget))
    if parametric is not None:
        try:
            n_opt, d_opt = compute_optimal(parametric.law, budget, relation)
            result.update(n_opt=n_opt, d_opt=d_opt, d_per_param=d_opt / n_opt,
                          predicted_error=float(parametric.law.predict(n_opt, d_opt)))
        except ValueError as failure:
            result["allocation_skipped"] = str(failure)
    return result


def _draw(out_dir: Path, trials: pd.DataFrame, frontier, power_fit, points, profiles, parametric,
          relation: ComputeRelation, budget, metric_label: str) -> dict[str, str]:
    colour_by = "width_multiplier" if "width_multiplier" in trials else "params" if "params" in trials else None
    colours = trials[colour_by].to_numpy(float) if colour_by else None
    written = {"error_vs_compute": plots.plot_error_vs_compute(
        trials["compute"], trials["error"], frontier, power_fit, out_dir / "error_vs_compute.png",
        colour_values=colours, colour_label=colour_by or "", y_label=metric_label)}
    if points is not None and len(points):
        x_name = "compute" if "compute" in points else "samples_seen"
        curves = {trial: (rows[x_name].to_numpy(float), rows["error"].to_numpy(float))
                  for trial, rows in points.groupby("trial_id")}
        by_trial = dict(zip(trials["trial_id"], colours)) if colours is not None else None
        written["learning_curves"] = plots.plot_learning_curves(
            curves, out_dir / "learning_curves.png", colour_values=by_trial, colour_label=colour_by or "",
            x_label=f"{x_name} (FLOPs)" if x_name == "compute" else x_name, y_label=metric_label)
    if profiles:
        written["isoflop"] = plots.plot_isoflops(profiles, out_dir / "isoflop.png", y_label=metric_label)
    if parametric is not None or len(profiles) >= 2:
        low = trials["compute"].min() / 10.0
        high = max(trials["compute"].max() * 100.0, budget or 0.0)
        compute_grid = np.geomspace(low, high, 60)
        n_line = None
        if parametric is not None and parametric.law.a > 0 and parametric.law.b > 0:
            n_line = np.array([compute_optimal(parametric.law, c, relation)[0] for c in compute_grid])
        written["optimal_size"] = plots.plot_optimal_size(
            compute_grid, n_line, [p["compute"] for p in profiles],
            [p["minimum"]["n_opt"] for p in profiles], out_dir / "optimal_size.png", budget=budget,
            minima_at_edge=[p["minimum"]["at_edge"] for p in profiles])
    return {name: str(path) for name, path in written.items() if path is not None}


# --------------------------------------------------------------------------- summary


def format_summary(report: dict) -> str:
    """A few lines for a terminal or a log."""
    lines = [f"metric {report['metric']} (error = {report['error']}): {report['n_usable']} usable of "
             f"{report['n_trials']} trials, {len(report['frontier_trials'])} on the compute frontier"]
    power = report["power_law"]
    if "skipped" in power:
        lines.append(f"power law: skipped ({power['skipped']})")
    else:
        lines.append(f"power law on the frontier: error = {power['beta']:.4g} * C^{power['alpha']:.4f}; "
                     f"{power['confidence']:.0%} CI alpha [{power['alpha_ci'][0]:.4f}, {power['alpha_ci'][1]:.4f}], "
                     f"beta [{power['beta_ci'][0]:.3g}, {power['beta_ci'][1]:.3g}] "
                     f"({power['n_bootstrap']} bootstrap resamples of {power['n_points']} points)")
        if power["n_points"] < 4:
            lines.append("  (fewer than 4 frontier points: the interval is not informative)")
    fit = report.get("parametric")
    if fit and "skipped" in fit:
        lines.append(f"L(N, D): skipped ({fit['skipped']})")
    elif fit:
        lines.append(f"L(N, D) = {fit['E']:.4g} + {fit['A']:.4g} / N^{fit['a']:.3f} + {fit['B']:.4g} / D^{fit['b']:.3f}"
                     f"  (D = {fit['data_column']}, {fit['n_points']} runs); N_opt ~ C^{fit['n_opt_exponent']:.3f}")
    relation = report["compute_relation"]
    lines.append(f"compute: C = 3 * {relation['k']:.4g} * N^{relation['p']:.3f} * D ({relation['source']})")
    if "isoflop_n_opt_exponent" in report:
        interior = sum(not p["minimum"]["at_edge"] for p in report["isoflop"])
        lines.append(f"IsoFLOP minima: N_opt ~ C^{report['isoflop_n_opt_exponent']:.3f} "
                     f"from {interior} interior minima of {len(report['isoflop'])} compute levels")
    if "budget" in report:
        budget = report["budget"]
        text = f"budget {budget['compute']:.3g} FLOPs ({budget['times_largest_run']:.3g}x the largest run):"
        if "n_opt" in budget:
            text += (f" N_opt {budget['n_opt']:.3g} params, D_opt {budget['d_opt']:.3g} "
                     f"({budget['d_per_param']:.3g} per param), L(N,D) predicts {budget['predicted_error']:.4g};")
        if "frontier_error" in budget:
            text += f" power law predicts {budget['frontier_error']:.4g}"
        lines.append(text)
    check = report["extrapolation"]
    if "skipped" in check:
        lines.append(f"extrapolation check: skipped ({check['skipped']})")
    else:
        parts = [f"{name} mean |relative error| {check[name]['mean_abs_relative_error']:.1%}"
                 if "mean_abs_relative_error" in check.get(name, {}) else f"{name} skipped"
                 for name in ("power_law", "parametric") if name in check]
        lines.append(f"extrapolation check (fit without the {check['n_held_out']} largest-compute runs, "
                     f"C >= {check['compute_threshold']:.3g}): " + "; ".join(parts))
    lines.append("plots: " + ", ".join(sorted(report["plots"])) if report["plots"] else "plots: none")
    return "\n".join(lines)
