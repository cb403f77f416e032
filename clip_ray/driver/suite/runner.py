"""Running a suite on one model: check the suite, run each task, write the results, log one MLflow run.

    suite = prepare_suite(load_suite("configs/suites/shared.yaml"))   # before Ray: paths, names, templates
    model = resolve_model("runs/flickr8k-vit-tiny")                   # pinned once
    outcome = evaluate_suite(suite, model)                            # Ray: features on the encoder actors

The results go three ways: a table printed by the caller (`outcome.rows`), files in the output
folder (results.csv, results.md, results.json with every count and the model's identity), and
one MLflow run in the evaluation experiment (clip_ray.tracking.evaluation): a metric per task
metric, the suite as params, tags naming the model.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from clip_ray.config import ConfigError, TrackingConfig, to_dict
from clip_ray.config.suite import LabelledImages, SuiteConfig, SuiteDefaults, task_key
from clip_ray.data.formats import check_failure_rate
from clip_ray.driver.suite.tasks import TASK_RUNNERS, check_task_class_names
from clip_ray.eval.report import SuiteRow, suite_markdown
from clip_ray.eval.templates import resolve_templates
from clip_ray.inference.models import ResolvedModel
from clip_ray.ray_session import connect_ray
from clip_ray.storage import is_uri, local_absolute
from clip_ray.tracking.evaluation import log_evaluation
from clip_ray.tracking.run import flatten_params, resolve_tracking_uri

log = logging.getLogger("clip_ray.eval_suite")

DEFAULT_OUTPUT_ROOT = "eval-results"
RESULT_FILES = ("results.csv", "results.md", "results.json")


@dataclass
class SuiteOutcome:
    suite: str
    model: dict  # ResolvedModel.identity()
    metrics: dict[str, float]  # "<task>/<metric>"
    rows: list[SuiteRow]
    tasks: dict[str, dict]  # per task: type, metrics, counts, info, seconds
    output: str
    tracking_uri: str | None = None
    experiment: str | None = None
    run_id: str | None = None
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- before Ray


def _absolute_spec(spec):
    """A class-name or template spec with a file path made absolute (set names and lists as they are)."""
    if isinstance(spec, str) and not is_uri(spec) and Path(spec).expanduser().exists():
        return local_absolute(spec)
    return spec


def _check_folder(path: str, key: str) -> None:
    if not is_uri(path) and not Path(path).is_dir():
        raise ConfigError(f"{key}={path!r}: no such folder (relative paths resolve against {Path.cwd()})")


def _prepare_images(images: LabelledImages, key: str) -> None:
    if images.image_folder is not None:
        images.image_folder = local_absolute(images.image_folder)
        _check_folder(images.image_folder, f"{key}.image_folder")
    else:
        images.source.path = local_absolute(images.source.path)
        if images.source.format in ("csv", "coco"):
            _check_folder(images.source.path, f"{key}.source.path")


def prepare_suite(suite: SuiteConfig) -> SuiteConfig:
    """A copy with local paths absolute, checked before Ray starts: folders exist, class names and templates
    resolve, an ImageFolder's class names match its folders. A problem is a ConfigError naming task and field."""
    suite = copy.deepcopy(suite)
    suite.validate()
    for i, task in enumerate(suite.tasks):
        key = task_key(i, task)
        if task.type == "retrieval":
            task.source.path = local_absolute(task.source.path)
            if task.source.format in ("csv", "coco"):
                _check_folder(task.source.path, f"{key}.source.path")
            continue
        task.class_names = _absolute_spec(task.class_names)
        sets = {"images": task.images} if task.type == "zeroshot" else {
            name: getattr(task, name) for name in ("images", "train", "test") if getattr(task, name) is not None}
        for name, images in sets.items():
            _prepare_images(images, f"{key}.{name}")
            check_task_class_names(images, task.class_names, key, name)
        if task.type == "zeroshot":
            task.templates = _absolute_spec(task.templates)
            try:
                resolve_templates(task.templates)
            except (ValueError, OSError) as err:
                raise ConfigError(f"{key}.templates={task.templates!r}: {err}") from None
    return suite


def model_short_id(model: ResolvedModel) -> str:
    """A folder-safe name for the model: its name, step and the start of its weights' digest (or model id)."""
    version = model.version
    digest = version.get("weights_sha256") or version.get("model_id") or "unknown"
    step = f"-step{version['step']}" if version.get("step") is not None else ""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{model.model_config.name}{step}-{str(digest)[:8]}")


def model_tags(model: ResolvedModel) -> dict[str, str | None]:
    """What names the evaluated model in MLflow: where it came from and what it is."""
    identity, version = model.identity(), model.version
    return {
        "clip_ray.model.source": model.source,
        "clip_ray.model.kind": model.kind,
        "clip_ray.model.location": model.location,
        "clip_ray.model.name": model.model_config.name,
        "clip_ray.model.sha256": version.get("weights_sha256"),
        "clip_ray.model.model_id": version.get("model_id"),
        "clip_ray.model.step": version.get("step"),
        "clip_ray.model.config_sha256": identity["config_sha256"],
        "clip_ray.model.tokenizer_sha256": model.tokenizer_sha256,
        "clip_ray.model.training_run_id": model.training_run_id,
        "clip_ray.model.short_id": model_short_id(model),
    }


# --------------------------------------------------------------------------- on Ray


def cluster_defaults(defaults: SuiteDefaults) -> SuiteDefaults:
    """The defaults with the actor count and GPU share settled from the connected cluster's resources."""
    defaults = copy.deepcopy(defaults)
    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 1.0)
    if defaults.num_gpus_per_actor is None:
        defaults.num_gpus_per_actor = 1.0 if gpus else 0.0
    if defaults.concurrency is None:
        if defaults.num_gpus_per_actor:
            defaults.concurrency = max(1, int(gpus // defaults.num_gpus_per_actor))
        else:
            defaults.concurrency = max(1, int(cpus // (defaults.num_cpus_per_actor + defaults.decode_cpus)))
    return defaults


def _rows(name: str, metrics: dict[str, float], num_classes: int | None) -> list[SuiteRow]:
    rows = []
    for metric, value in metrics.items():
        top = re.fullmatch(r"(?:.*/)?top(\d+)", metric)
        chance = min(1.0, int(top.group(1)) / num_classes) if top and num_classes else None
        rows.append((name, metric, value, chance))
    return rows


def evaluate_suite(suite: SuiteConfig, model: ResolvedModel, *, output: str | None = None,
                   tracking_uri: str | None = None, experiment: str | None = None,
                   log_to_mlflow: bool = True) -> SuiteOutcome:
    """Runs every task of `suite` on `model` (on the connected Ray cluster, or one `connect_ray` starts),
    writes the results into `output` (default eval-results/<suite>-<model short id>) and logs one MLflow run.
    Raises ConfigError for a suite that cannot run, DataError for a task whose input is too broken."""
    started = time.time()
    suite = prepare_suite(suite)
    output = local_absolute(output or str(Path(DEFAULT_OUTPUT_ROOT) / f"{suite.name}-{model_short_id(model)}"))
    connect_ray()
    defaults = cluster_defaults(suite.defaults)
    log.info("suite %s on %s: %d tasks, %d encoder actor(s) of %s CPU / %s GPU", suite.name, model.location,
             len(suite.tasks), defaults.concurrency, defaults.num_cpus_per_actor, defaults.num_gpus_per_actor)
    metrics, rows, tasks = {}, [], {}
    for i, task in enumerate(suite.tasks):
        key = task_key(i, task)
        task_started = time.time()
        result = TASK_RUNNERS[task.type](task, model, defaults, key)
        check_failure_rate(result.counts, defaults.max_failure_fraction, key)
        seconds = time.time() - task_started
        log.info("%s: %s in %.1f s (%s)", key, {k: round(v, 4) for k, v in result.metrics.items()}, seconds,
                 result.counts.summary())
        metrics.update({f"{task.name}/{name}": value for name, value in result.metrics.items()})
        rows += _rows(task.name, result.metrics, result.info.get("num_classes"))
        tasks[task.name] = {"type": task.type, "metrics": result.metrics, "counts": result.counts.to_dict(),
                            "info": result.info, "seconds": round(seconds, 3)}
    outcome = SuiteOutcome(suite=suite.name, model=model.identity(), metrics=metrics, rows=rows, tasks=tasks,
                           output=output)
    outcome.files = write_results(outcome, model_short_id(model))
    if log_to_mlflow:
        outcome.tracking_uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
        outcome.experiment = experiment or suite.defaults.experiment
        tags = {**model_tags(model), "clip_ray.eval.suite": suite.name}
        outcome.run_id = log_evaluation(
            outcome.tracking_uri, outcome.experiment, f"{suite.name} {model_short_id(model)}", metrics=metrics,
            params=flatten_params(to_dict(suite), "suite"), tags=tags, artifacts=output)
        write_results(outcome, model_short_id(model))  # results.json now names the run
    outcome.seconds = time.time() - started
    return outcome


def write_results(outcome: SuiteOutcome, column: str) -> list[str]:
    """results.csv (task, type, metric, value), results.md (the table) and results.json (all of it)."""
    folder = Path(outcome.output)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "type", "metric", "value"])
        for task, metric, value, _ in outcome.rows:
            writer.writerow([task, outcome.tasks[task]["type"], metric, repr(float(value))])
    (folder / "results.md").write_text(f"Suite `{outcome.suite}`, model `{column}`\n\n"
                                       f"{suite_markdown(outcome.rows, column)}\n")
    summary = {"suite": outcome.suite, "model": outcome.model, "metrics": outcome.metrics, "tasks": outcome.tasks,
               "mlflow": {"tracking_uri": outcome.tracking_uri, "experiment": outcome.experiment,
                          "run_id": outcome.run_id}}
    (folder / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    return [str(folder / name) for name in RESULT_FILES]
