"""The WiSE-FT job: every alpha mixed and scored, the best chosen and saved, the results files and the MLflow run."""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from clip_ray.config import ConfigError, TrackingConfig
from clip_ray.driver.suite import model_short_id
from clip_ray.driver.suite.runner import model_tags
from clip_ray.driver.wise_ft.evaluations import ALPHAS_DIR, MixtureEvaluation
from clip_ray.driver.wise_ft.mixing import (
    DEFAULT_ALPHAS, alpha_step, check_alphas, check_compatible, check_state_dicts, copy_tokenizer, mix_state_dicts,
    mixture_config, save_mixture_checkpoint)
from clip_ray.inference.models import ResolvedModel
from clip_ray.ray_session import connect_ray
from clip_ray.storage import local_absolute
from clip_ray.tracking.evaluation import log_evaluation
from clip_ray.tracking.run import resolve_tracking_uri
from clip_ray.tracking.tracker import mlflow_metric_name

log = logging.getLogger("clip_ray.wise_ft")

DEFAULT_OUTPUT_ROOT = "wise-ft-results"
DEFAULT_EXPERIMENT = "clip-ray-wise-ft"
BEST_DIR = "best"
RESULT_FILES = ("wise_ft.csv", "wise_ft.md", "wise_ft.json")
# The default selection score: the mean of these per-task metrics where present (a task's retrieval R@5
# both ways, a zero-shot task's top-1; a linear probe's top-1 is one level deeper and not included).
DEFAULT_SELECTION = ("image_to_text_R@5", "text_to_image_R@5", "top1")
SCORE = "wise_ft/score"


# --------------------------------------------------------------------------- choosing the best


def selection_metrics(metrics: dict[str, float], select: str | None) -> list[str]:
    """The metrics whose mean is the selection score: `select` (a metric name, '@' or '_at_'), or by default
    every `<task>/<m>` for m in DEFAULT_SELECTION. A ConfigError lists the metrics there are."""
    if select is not None:
        wanted = mlflow_metric_name(select)
        chosen = [name for name in metrics if mlflow_metric_name(name) == wanted]
    else:
        chosen = [name for name in metrics if name.count("/") == 1 and name.split("/")[1] in DEFAULT_SELECTION]
    if not chosen:
        what = f"--select {select}: no such metric" if select else \
            f"no metric to select by (by default the mean of <task>/{', <task>/'.join(DEFAULT_SELECTION)})"
        raise ConfigError(f"{what}; the evaluation gives {', '.join(sorted(metrics))}")
    return sorted(chosen)


def selection_score(metrics: dict[str, float], chosen: Sequence[str]) -> float:
    return statistics.fmean(metrics[name] for name in chosen)


# --------------------------------------------------------------------------- the job


@dataclass
class WiseFtOutcome:
    alphas: list[float]
    metrics: dict[float, dict[str, float]]  # alpha -> every metric of that mixture
    scores: dict[float, float]
    selection: list[str]  # the metrics averaged into the score
    best_alpha: float
    output: str
    best_model: str  # the best mixture's checkpoint directory
    initial: dict  # ResolvedModel.identity()
    finetuned: dict
    tracking_uri: str | None = None
    experiment: str | None = None
    run_id: str | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def best_metrics(self) -> dict[str, float]:
        return self.metrics[self.best_alpha]


def wise_ft(initial: ResolvedModel, finetuned: ResolvedModel, evaluation: MixtureEvaluation, *,
            alphas: Sequence[float] = DEFAULT_ALPHAS, output: str | None = None, select: str | None = None,
            tracking_uri: str | None = None, experiment: str | None = None,
            log_to_mlflow: bool = True) -> WiseFtOutcome:
    """Mixes the two models at each alpha, evaluates every mixture, saves the best (highest score; the
    smallest alpha on a tie) into OUTPUT/best, writes the results files and logs one MLflow run.
    Runs on the connected Ray cluster, or one `connect_ray` starts."""
    started = time.time()
    alphas = check_alphas(alphas)
    check_compatible(initial, finetuned)
    output = Path(local_absolute(output or str(Path(DEFAULT_OUTPUT_ROOT) / model_short_id(finetuned))))
    start_weights, tuned_weights = initial.state_dict(), finetuned.state_dict()
    check_state_dicts(start_weights, tuned_weights)
    model_config = mixture_config(initial, finetuned)
    tokenizer_path = copy_tokenizer(finetuned, output / BEST_DIR)
    connect_ray()
    evaluation.setup(model_config, tokenizer_path, output)
    metrics: dict[float, dict[str, float]] = {}
    chosen: list[str] = []
    for alpha in alphas:
        alpha_started = time.time()
        metrics[alpha] = evaluation(alpha, mix_state_dicts(start_weights, tuned_weights, alpha))
        chosen = chosen or selection_metrics(metrics[alpha], select)  # a wrong --select fails at the first
        log.info("alpha %.2f: score %.4f (%s) in %.1f s", alpha, selection_score(metrics[alpha], chosen),
                 ", ".join(f"{name} {metrics[alpha][name]:.4f}" for name in chosen), time.time() - alpha_started)
    scores = {alpha: selection_score(values, chosen) for alpha, values in metrics.items()}
    best_alpha = max(alphas, key=lambda alpha: (scores[alpha], -alpha))
    about = {"alpha": best_alpha, "initial": initial.source, "finetuned": finetuned.source,
             "score": scores[best_alpha], "selection": chosen}
    best = save_mixture_checkpoint(output / BEST_DIR, model_config,
                                   mix_state_dicts(start_weights, tuned_weights, best_alpha), tokenizer_path, about)
    outcome = WiseFtOutcome(alphas=alphas, metrics=metrics, scores=scores, selection=chosen, best_alpha=best_alpha,
                            output=str(output), best_model=str(best), initial=initial.identity(),
                            finetuned=finetuned.identity())
    outcome.files = write_results(outcome)
    if log_to_mlflow:
        outcome.tracking_uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
        outcome.experiment = experiment or DEFAULT_EXPERIMENT
        outcome.run_id = log_wise_ft_run(outcome, initial, finetuned, evaluation, select)
        write_results(outcome)  # wise_ft.json now names the run
    outcome.seconds = time.time() - started
    return outcome


def log_wise_ft_run(outcome: WiseFtOutcome, initial: ResolvedModel, finetuned: ResolvedModel,
                    evaluation: MixtureEvaluation, select: str | None) -> str:
    """One run: each alpha's metrics (and score) at its step, the best at step 0, the models as tags, the
    results files, each alpha's results and the best mixture's checkpoint as artifacts."""
    series = {alpha_step(alpha): {**values, SCORE: outcome.scores[alpha]} for alpha, values in outcome.metrics.items()}
    best = {"wise_ft/best_alpha": outcome.best_alpha, "best/score": outcome.scores[outcome.best_alpha],
            **{f"best/{name}": value for name, value in outcome.best_metrics.items()}}
    tags = {**{f"clip_ray.wise_ft.{role}.{key.removeprefix('clip_ray.model.')}": value
               for role, model in (("initial", initial), ("finetuned", finetuned))
               for key, value in model_tags(model).items()},
            "clip_ray.wise_ft.best_alpha": outcome.best_alpha}
    params = {"wise_ft.alphas": ",".join(f"{alpha:g}" for alpha in outcome.alphas),
              "wise_ft.select": select or "default", "wise_ft.selection": ",".join(outcome.selection),
              "wise_ft.evaluation": evaluation.describes, "wise_ft.initial": initial.source,
              "wise_ft.finetuned": finetuned.source, **evaluation.params()}
    output = Path(outcome.output)
    sources = [*(("", output / name) for name in RESULT_FILES), ("best_model", output / BEST_DIR),
               (ALPHAS_DIR, output / ALPHAS_DIR)]
    run_name = f"wise-ft {model_short_id(finetuned)}"
    return log_evaluation(outcome.tracking_uri, outcome.experiment, run_name, metrics=best, params=params,
                          tags=tags, artifacts=[(f, p) for f, p in sources if p.exists()], series=series)


# --------------------------------------------------------------------------- results


def table_columns(outcome: WiseFtOutcome) -> list[str]:
    return [*outcome.selection, SCORE]


def results_table(outcome: WiseFtOutcome, markdown: bool = False) -> str:
    """One row per alpha: the metrics of the score, the score; the best row marked."""
    columns = table_columns(outcome)
    rows = [[f"{alpha:.2f}{' *' if alpha == outcome.best_alpha else '  '}",
             *(f"{outcome.metrics[alpha].get(name, outcome.scores[alpha] if name == SCORE else float('nan')):.4f}"
               for name in columns)] for alpha in outcome.alphas]
    header = ["alpha", *columns]
    if markdown:
        lines = [f"| {' | '.join(header)} |", f"| {' | '.join(['---:'] * len(header))} |"]
        return "\n".join([*lines, *(f"| {' | '.join(cell.strip() for cell in row)} |" for row in rows)])
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows])


def write_results(outcome: WiseFtOutcome) -> list[str]:
    """wise_ft.csv (alpha, metric, value), wise_ft.md (the table) and wise_ft.json (all of it)."""
    folder = Path(outcome.output)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "wise_ft.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["alpha", "metric", "value"])
        for alpha in outcome.alphas:
            for name, value in [*sorted(outcome.metrics[alpha].items()), (SCORE, outcome.scores[alpha])]:
                writer.writerow([repr(alpha), name, repr(float(value))])
    (folder / "wise_ft.md").write_text(
        f"WiSE-FT of `{outcome.initial['source']}` (alpha 0) and `{outcome.finetuned['source']}` (alpha 1); "
        f"score: mean of {', '.join(outcome.selection)}; best alpha {outcome.best_alpha:g} (*)\n\n"
        f"{results_table(outcome, markdown=True)}\n")
    summary = {"alphas": outcome.alphas, "metrics": {repr(a): m for a, m in outcome.metrics.items()},
               "scores": {repr(a): s for a, s in outcome.scores.items()}, "selection": outcome.selection,
               "best_alpha": outcome.best_alpha, "best_metrics": outcome.best_metrics,
               "best_model": outcome.best_model, "initial": outcome.initial, "finetuned": outcome.finetuned,
               "mlflow": {"tracking_uri": outcome.tracking_uri, "experiment": outcome.experiment,
                          "run_id": outcome.run_id}}
    (folder / "wise_ft.json").write_text(json.dumps(summary, indent=2, default=str))
    return [str(folder / name) for name in RESULT_FILES]
