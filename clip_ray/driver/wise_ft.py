"""WiSE-FT (Wortsman et al. 2022): weight-space ensembles of a model and its fine-tuned version, each evaluated.

    theta(alpha) = (1 - alpha) * theta_initial + alpha * theta_finetuned

Fine-tuning gains on the target data and often loses robustness elsewhere; a mixture between the two weight
sets often keeps most of both. For each alpha the mixture is evaluated by the evaluation suite
(`SuiteMixtures`: clip_ray/driver/suite, features on Ray Data encoder actors) or by a training config's own
evaluation (`ConfigMixtures`: eval/evaluate.py's Evaluator on the config's data.val and zero-shot folder,
on the driver), the mixtures one after another in one Ray session. The best one by a selection score is
saved as a checkpoint directory the rest of clip-ray loads (`clip-ray eval DIR/best`, `model.init_from`),
and one MLflow run records it all: every metric once per alpha at step round(100 * alpha), so the MLflow
UI draws each as a curve over the ratio, and the best alpha with its metrics (`best/...`) at step 0.

The two models must compute the same function of their weights: the same architecture (`ModelConfig`
less its training-only fields, its name and gradient checkpointing) and the same tokenizer (by SHA-256),
and their weights the same names and shapes; anything else is an `IncompatibleModelsError` naming what
differs. Integer buffers (a ResNet's BatchNorm batch counts) are counters, not weights: the fine-tuned
model's are kept.

Output folder:

    wise_ft.csv, wise_ft.md, wise_ft.json   every metric per alpha, the score, the best; the models' identities
    alphas/alpha-0.50/                       a suite's results files for that mixture (and its model.pt when kept)
    best/                                    the best mixture: model.pt, training_state.pt, manifest.json + tokenizer
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import torch

from clip_ray.config import Config, ConfigError, ModelConfig, TrackingConfig, to_dict
from clip_ray.config.model import TRAINING_ONLY_FIELDS
from clip_ray.config.suite import SuiteConfig
from clip_ray.driver.suite import evaluate_suite, model_short_id
from clip_ray.driver.suite.runner import model_tags
from clip_ray.eval.evaluate import Evaluator
from clip_ray.inference.models import ModelSourceError, ResolvedModel, resolve_model
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.ray_session import connect_ray
from clip_ray.storage import is_uri, local_absolute
from clip_ray.tracking.evaluation import log_evaluation
from clip_ray.tracking.run import flatten_params, resolve_tracking_uri
from clip_ray.tracking.tracker import mlflow_metric_name
from clip_ray.worker.checkpoint import MODEL_FILE, save_training_state

log = logging.getLogger("clip_ray.wise_ft")

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
# Each alpha is logged to MLflow at step round(STEP_SCALE * alpha): 0..100, the fine-tuned share in percent.
STEP_SCALE = 100
DEFAULT_OUTPUT_ROOT = "wise-ft-results"
DEFAULT_EXPERIMENT = "clip-ray-wise-ft"
BEST_DIR = "best"
ALPHAS_DIR = "alphas"
RESULT_FILES = ("wise_ft.csv", "wise_ft.md", "wise_ft.json")
# Config fields that do not change what the network computes from its weights.
NON_ARCHITECTURE_FIELDS = ("name", "grad_checkpointing", *TRAINING_ONLY_FIELDS)
# The default selection score: the mean of these per-task metrics where present (a task's retrieval R@5
# both ways, a zero-shot task's top-1; a linear probe's top-1 is one level deeper and not included).
DEFAULT_SELECTION = ("image_to_text_R@5", "text_to_image_R@5", "top1")
SCORE = "wise_ft/score"


class IncompatibleModelsError(ModelSourceError):
    """The two models cannot be mixed: another architecture, tokenizer or set of weights; the message says which."""


# --------------------------------------------------------------------------- checking


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The mixing ratios, sorted; each in [0, 1] and on its own MLflow step (at least 0.01 apart)."""
    alphas = sorted({float(alpha) for alpha in alphas})
    if not alphas:
        raise ConfigError("--alphas: give at least one mixing ratio")
    for alpha in alphas:
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ConfigError(f"--alphas: {alpha} is not in [0, 1] (0 is the initial model, 1 the fine-tuned one)")
    steps = [alpha_step(alpha) for alpha in alphas]
    for (a, step_a), (b, step_b) in zip(zip(alphas, steps), zip(alphas[1:], steps[1:])):
        if step_a == step_b:
            raise ConfigError(f"--alphas: {a} and {b} would both be MLflow step {step_a}; give ratios at least "
                              f"{1 / STEP_SCALE} apart")
    return alphas


def alpha_step(alpha: float) -> int:
    return round(alpha * STEP_SCALE)


def alpha_name(alpha: float) -> str:
    """The folder name of a mixture: alpha-0.50."""
    step = alpha_step(alpha)
    return f"alpha-{step // STEP_SCALE}.{step % STEP_SCALE:02d}"


def architecture_differences(initial: ModelConfig, finetuned: ModelConfig) -> list[str]:
    """'model.vision.layers: 4 (initial) vs 6 (fine-tuned)' for each architecture field that differs."""
    first, second = (flatten_params({k: v for k, v in to_dict(c).items() if k not in NON_ARCHITECTURE_FIELDS},
                                    "model") for c in (initial, finetuned))
    return [f"{key}: {first.get(key, '(absent)')} (initial) vs {second.get(key, '(absent)')} (fine-tuned)"
            for key in sorted(set(first) | set(second)) if first.get(key) != second.get(key)]


def check_compatible(initial: ResolvedModel, finetuned: ResolvedModel) -> None:
    """Raises IncompatibleModelsError when the two models differ in architecture or tokenizer."""
    differences = architecture_differences(initial.model_config, finetuned.model_config)
    if differences:
        raise IncompatibleModelsError(f"--initial {initial.source} and --finetuned {finetuned.source} have "
                                      f"different architectures: {'; '.join(differences)}")
    if initial.tokenizer_sha256 != finetuned.tokenizer_sha256:
        raise IncompatibleModelsError(
            f"--initial {initial.source} and --finetuned {finetuned.source} use different tokenizers: "
            f"{initial.tokenizer_path} (sha256 {initial.tokenizer_sha256[:12]}) vs {finetuned.tokenizer_path} "
            f"(sha256 {finetuned.tokenizer_sha256[:12]}); fine-tuning keeps the tokenizer, or pass --tokenizer")


def check_state_dicts(initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor]) -> None:
    """Raises IncompatibleModelsError naming the first tensor that one model lacks or holds in another shape."""
    for name in sorted(set(initial) ^ set(finetuned)):
        side = "initial" if name in initial else "fine-tuned"
        raise IncompatibleModelsError(f"tensor {name}: only the {side} model has it")
    for name in sorted(initial):
        if initial[name].shape != finetuned[name].shape:
            raise IncompatibleModelsError(f"tensor {name}: shape {tuple(initial[name].shape)} (initial) vs "
                                          f"{tuple(finetuned[name].shape)} (fine-tuned)")


def resolve_pair(initial: str, finetuned: str, tokenizer: str | None = None, tracking_uri: str | None = None,
                 activation: str = "quick_gelu") -> tuple[ResolvedModel, ResolvedModel]:
    """Both models pinned (see clip_ray.inference.models) and checked to be mixable."""
    pair = tuple(resolve_model(source, tokenizer, tracking_uri, activation) for source in (initial, finetuned))
    check_compatible(*pair)
    return pair


# --------------------------------------------------------------------------- mixing


def mix_state_dicts(initial: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                    alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * initial + alpha * finetuned for every floating-point tensor, in float32 (alpha 0 and 1 give
    the two weight sets exactly); integer buffers (counters) are the fine-tuned model's."""
    mixture = {}
    for name, tuned in finetuned.items():
        start = initial[name]
        if not tuned.is_floating_point():
            mixture[name] = tuned.clone()
        elif alpha == 0.0:
            mixture[name] = start.float().clone()
        elif alpha == 1.0:
            mixture[name] = tuned.float().clone()
        else:
            mixture[name] = (1.0 - alpha) * start.float() + alpha * tuned.float()
    return mixture


def build_mixture(model_config: ModelConfig, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CLIP of `model_config` holding `weights` (strictly: every tensor, no other), in eval mode."""
    model = build_model(model_config, device="meta")
    model.load_state_dict(weights, strict=True, assign=True)
    return model.float().eval()


def save_mixture_file(path: Path, model_config: ModelConfig, weights: dict[str, torch.Tensor]) -> Path:
    """A model.pt as checkpoints hold it ({"model_config", "state_dict"}): `resolve_model` reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": to_dict(model_config), "state_dict": weights}, path)
    return path


def save_mixture_checkpoint(directory: Path, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                            tokenizer_path: str, about: dict) -> Path:
    """A complete checkpoint directory whose run config names the tokenizer beside it, so `clip-ray eval
    DIR`, `clip-ray embed --model DIR` and `model.init_from: DIR` need nothing else. It holds no optimiser
    state: it is a model to use or to start a new run from, not a run to resume."""
    return save_training_state(directory, model=build_model(model_config, device="meta"), optimizer=None, step=0,
                               state_dicts=(weights, {}),
                               config={"data": {"tokenizer": tokenizer_path}, "wise_ft": about})


def copy_tokenizer(model: ResolvedModel, folder: Path) -> str:
    """The model's tokenizer copied byte for byte into `folder` (saved anew when it is an MLflow artifact)."""
    folder.mkdir(parents=True, exist_ok=True)
    source = model.tokenizer_path
    if not is_uri(source) and not source.startswith("runs:/") and Path(source).is_file():
        target = folder / Path(source).name
        if Path(source).resolve() != target.resolve():
            shutil.copyfile(source, target)
        return str(target)
    return str(model.tokenizer.save(folder))


# --------------------------------------------------------------------------- evaluating one mixture


class MixtureEvaluation(Protocol):
    """What scores the mixtures: `setup` once, then one call per alpha, returning {metric name: value}."""

    describes: str  # what it evaluates on, for the MLflow params

    def setup(self, model_config: ModelConfig, tokenizer_path: str, output: Path) -> None: ...

    def __call__(self, alpha: float, weights: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def params(self) -> dict[str, str]: ...


@dataclass
class SuiteMixtures:
    """Each mixture written to alphas/alpha-X/model.pt, resolved and run through the evaluation suite, whose
    results files go beside it; the weights file is removed afterwards unless `keep_mixtures`."""

    suite: SuiteConfig
    keep_mixtures: bool = False
    describes: str = "suite"
    model_config: ModelConfig | None = field(default=None, init=False)
    tokenizer_path: str | None = field(default=None, init=False)
    output: Path | None = field(default=None, init=False)

    def setup(self, model_config: ModelConfig, tokenizer_path: str, output: Path) -> None:
        self.model_config, self.tokenizer_path, self.output = model_config, tokenizer_path, output

    def __call__(self, alpha: float, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        folder = self.output / ALPHAS_DIR / alpha_name(alpha)
        path = save_mixture_file(folder / MODEL_FILE, self.model_config, weights)
        try:
            mixture = resolve_model(str(path), self.tokenizer_path)
            outcome = evaluate_suite(self.suite, mixture, output=str(folder), log_to_mlflow=False)
        finally:
            if not self.keep_mixtures:
                path.unlink(missing_ok=True)
        return outcome.metrics

    def params(self) -> dict[str, str]:
        return flatten_params(to_dict(self.suite), "suite")


@dataclass
class ConfigMixtures:
    """Each mixture built in this process and measured by the training run's own evaluation (the Evaluator
    on the prepared config's data.val and zero-shot folder), the validation data read through Ray Data."""

    config: Config  # prepared (clip_ray.driver.prepare.prepare_job)
    device: str | None = None
    describes: str = "config"
    evaluator: Evaluator | None = field(default=None, init=False)

    def setup(self, model_config: ModelConfig, tokenizer_path: str, output: Path) -> None:
        device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        config = copy.deepcopy(self.config)
        config.model = copy.deepcopy(model_config)  # image size and context length are the model's
        config.data.tokenizer = tokenizer_path  # the models' own, whatever the config names
        config.train.precision = "fp32" if device.type == "cpu" else config.train.precision
        tokenizer = load_tokenizer(tokenizer_path, model_config.text.context_length)
        self.config = config
        self.evaluator = Evaluator(config, tokenizer, device)

    def __call__(self, alpha: float, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        model = build_mixture(self.config.model, weights).to(self.evaluator.device)
        return {name: value for name, value in self.evaluator(model).items() if name != "eval/seconds"}

    def params(self) -> dict[str, str]:
        return {**flatten_params(to_dict(self.config.data), "data"), **flatten_params(to_dict(self.config.eval),
                                                                                       "eval")}


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
    model_config = finetuned.model_config
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
    rows = [[f"{alpha:.2f}{' *' if alpha == outcome.best_alpha else ''}",
             *(f"{outcome.metrics[alpha].get(name, outcome.scores[alpha] if name == SCORE else float('nan')):.4f}"
               for name in columns)] for alpha in outcome.alphas]
    header = ["alpha", *columns]
    if markdown:
        lines = [f"| {' | '.join(header)} |", f"| {' | '.join(['---:'] * len(header))} |"]
        return "\n".join([*lines, *(f"| {' | '.join(row)} |" for row in rows)])
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
