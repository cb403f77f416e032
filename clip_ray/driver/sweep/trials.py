"""One sweep trial: its point in the search space, its job config, its Tune driver, its record.

A trial is a Ray Tune function trainable that builds and fits one TorchTrainer
(the Ray Train V2 way; `Tuner(trainer)` is gone). Its workers report every
mid-run evaluation to Ray Train; `EvaluationsToTune` forwards those to Tune so
ASHA can stop a trial that trails. When the fit ends the driver writes the
trial's record (sizes, compute, final metrics, learning curves) next to the
sweep and reports it to Tune as the trial's last result.

A record on storage marks a finished trial: a trial Tune starts again after the
sweep's driver died (its state may lag a few seconds behind) reports the record
instead of training again.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from typing import Any

from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search import BasicVariantGenerator

from clip_ray.config import Config, SweepConfig
from clip_ray.driver.prepare import PreparedJob
from clip_ray.driver.trainer import train
from clip_ray.model import model_stats, scale_model
from clip_ray.storage import join, resolve, write_file
from clip_ray.tracking.tracker import mlflow_metric_name
from clip_ray.worker.entry import log_to_stdout

log = logging.getLogger("clip_ray.driver.sweep")

RECORDS_DIR = "trials"
RUNS_DIR = "runs"
# Metrics whose MLflow history becomes the trial's learning curves.
CURVE_METRICS = ("val/loss", "train/loss", "zeroshot/top1", "val/image_to_text_R@5", "val/text_to_image_R@5")


# --------------------------------------------------------------------------- the search space


def space_values(sweep: SweepConfig, base: Config) -> dict[str, list]:
    """The values of each axis; an axis left empty takes the base job's value."""
    return {
        "width_multiplier": [float(w) for w in sweep.width_multipliers],
        "samples_seen": [int(n) for n in sweep.samples_seen]
        or [base.train.steps * base.train.global_batch_size],
        "lr": [float(lr) for lr in sweep.lrs] or [base.train.lr],
    }


def param_space(sweep: SweepConfig, base: Config) -> dict:
    """Tune's param_space: every combination (grid) or independent draws (random)."""
    pick = tune.grid_search if sweep.search == "grid" else tune.choice
    return {name: pick(values) for name, values in space_values(sweep, base).items()}


def search_algorithm(sweep: SweepConfig):
    """Tune's generator of the points, seeded so that a random search run again draws the same ones."""
    return BasicVariantGenerator(max_concurrent=sweep.max_concurrent_trials, random_state=sweep.seed)


def trial_key(params: dict) -> str:
    """A readable name for a point of the space: w0.5-n12800-lr0.001."""
    return f"w{params['width_multiplier']:g}-n{int(params['samples_seen'])}-lr{params['lr']:g}"


def trial_config(base: Config, sweep: SweepConfig, params: dict, name: str, runs_path: str,
                 parent_run_id: str | None) -> Config:
    """The base job at this point of the space, as one Ray Train run under runs_path/name.

    Steps are samples_seen / global_batch_size rounded up; the warm-up is capped at a
    quarter of them so the shortest trials still decay; evaluations (and checkpoints)
    are spread evenly, evals_per_trial of them, the last at the end.
    """
    config = copy.deepcopy(base)
    width = float(params["width_multiplier"])
    config.model = scale_model(base.model, width)
    config.model.name = f"{base.model.name}-x{width:g}"
    train = config.train
    train.steps = max(1, math.ceil(int(params["samples_seen"]) / train.global_batch_size))
    train.lr = float(params["lr"])
    train.warmup_steps = min(train.warmup_steps, train.steps // 4)
    train.eval_every = max(1, train.steps // sweep.evals_per_trial)
    train.checkpoint_every = train.eval_every
    train.log_every = max(1, min(train.log_every, train.eval_every))
    config.cluster.storage_path = runs_path
    config.cluster.run_name = name
    config.cluster.fresh_start = False  # a restarted trial resumes its run
    config.tracking.parent_run_id = parent_run_id
    config.tracking.run_name = name
    config.tracking.log_model = sweep.log_trial_models
    config.validate()
    return config


# --------------------------------------------------------------------------- reports to Tune


class EvaluationsToTune(TuneReportCallback):
    """A Ray Train callback forwarding the mid-run evaluations (reports that carry `metric` and no
    checkpoint) to Tune, for ASHA to rank the trial by.

    Checkpoint-only reports lack the metric, and Tune refuses a result without it. The final
    evaluation comes with the last checkpoint and is not forwarded: Tune hears of it from the
    trial's driver once the record is written, so a scheduler stopping the trial on it loses nothing.
    """

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        if checkpoint is None and metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, None)


# --------------------------------------------------------------------------- the trial's record


def record_path(sweep_dir: str, name: str) -> str:
    return join(join(sweep_dir, RECORDS_DIR), f"{name}.json")


def read_record(path: str) -> dict | None:
    fs, fs_path = resolve(path)
    try:
        with fs.open_input_stream(fs_path) as stream:
            return json.loads(stream.read().decode())
    except FileNotFoundError:
        return None


def write_record(path: str, record: dict) -> None:
    """Atomically: a reader (a restarted sweep) sees a whole record or none."""
    write_file(path, json.dumps(record, indent=2, sort_keys=True, default=float).encode())


def learning_curves(tracking_uri: str, run_id: str | None, global_batch_size: int) -> list[dict]:
    """CURVE_METRICS of the trial's MLflow run as (step, samples_seen, metric, value) rows."""
    if not run_id:
        return []
    client = MlflowClient(tracking_uri)
    rows = []
    for metric in CURVE_METRICS:
        try:
            history = client.get_metric_history(run_id, mlflow_metric_name(metric))
        except Exception as err:  # noqa: BLE001 - the record is kept without curves, and says so
            log.warning("learning curve %s of MLflow run %s not read: %s", metric, run_id, err)
            continue
        # A step logged twice (a run resumed from its last checkpoint evaluates it again) is one point: the latest.
        latest = {m.step: m.value for m in sorted(history, key=lambda m: (m.timestamp, m.step))}
        rows += [{"step": step, "samples_seen": step * global_batch_size, "metric": metric, "value": value}
                 for step, value in sorted(latest.items())]
    return rows


def trial_row(name: str, params: dict, config: Config, position: dict, metrics: dict, wall_time_s: float,
              status: str) -> dict:
    """One results-table row: the trial's point, its measured sizes and compute, its last metrics.

    `position` holds the loop's step / samples_seen / unique_samples; `metrics` its evaluation
    (val/..., zeroshot/...), kept under the loop's names plus the analysis' val_loss and zeroshot_top1.
    """
    stats = model_stats(config.model)
    samples_seen = int(position.get("samples_seen", 0))
    row: dict[str, Any] = {
        "trial_id": name,
        "status": status,
        "width_multiplier": float(params["width_multiplier"]),
        "lr": float(params["lr"]),
        "target_samples": int(params["samples_seen"]),
        "model": config.model.name,
        "params": stats["params_total"], "params_vision": stats["params_vision"], "params_text": stats["params_text"],
        "flops_per_sample": stats["flops_per_sample"],
        "steps": int(position.get("step", 0)),
        "samples_seen": samples_seen,
        "unique_samples": int(position.get("unique_samples", 0)) or samples_seen,
        "compute": 3.0 * stats["flops_per_sample"] * samples_seen,
        "val_loss": metrics.get("val/loss", float("nan")),
        "zeroshot_top1": metrics.get("zeroshot/top1", float("nan")),
        "wall_time_s": wall_time_s,
    }
    row.update({k: float(v) for k, v in metrics.items() if k.startswith(("val/", "zeroshot/"))})
    return row


def trial_record(name: str, params: dict, config: Config, outcome, wall_time_s: float) -> dict:
    """The row of a finished trial, with where it lives and its learning curves under "curves"."""
    record = trial_row(name, params, config, outcome.summary, outcome.final, wall_time_s, "finished")
    record.update({"mlflow_run_id": outcome.mlflow_run_id, "run_path": outcome.run_path, "finished_at": time.time()})
    record["curves"] = learning_curves(outcome.tracking_uri, outcome.mlflow_run_id, config.train.global_batch_size)
    return record


def tune_result(record: dict) -> dict:
    """What Tune keeps of a record: the numbers, not the curves."""
    return {k: v for k, v in record.items() if k != "curves"}


# --------------------------------------------------------------------------- the Tune trainable


def run_trial(params: dict, setup: dict) -> None:
    """Tune's function trainable. `setup` (put in the object store once by tune.with_parameters):
    the base job as a dict, the sweep section, the sweep directory, the MLflow parent run."""
    log_to_stdout()
    base, sweep = setup["base"], setup["sweep"]
    name = f"{trial_key(params)}-{tune.get_context().get_trial_id()}"
    path = record_path(setup["sweep_dir"], name)
    finished = read_record(path)
    if finished is not None:
        log.info("trial %s finished before the sweep restarted: its record is reported, nothing retrained", name)
        tune.report(tune_result(finished))
        return
    config = trial_config(base, sweep, params, name, join(setup["sweep_dir"], RUNS_DIR), setup["parent_run_id"])
    started = time.perf_counter()
    # Derived from the prepared base by trial_config: nothing of it needs preparing again.
    outcome = train(PreparedJob(config), callbacks=[EvaluationsToTune(sweep.metric)])
    if outcome.result.error is not None:
        raise outcome.result.error
    record = trial_record(name, params, config, outcome, time.perf_counter() - started)
    write_record(path, record)
    log.info("trial %s: %s=%.4f after %d samples (%.3g FLOPs) in %.0f s", name, sweep.metric,
             record.get(sweep.metric, float("nan")), record["samples_seen"], record["compute"],
             record["wall_time_s"])
    tune.report(tune_result(record))


def setup_payload(base: Config, sweep: SweepConfig, sweep_dir: str, parent_run_id: str | None) -> dict:
    return {"base": base, "sweep": sweep, "sweep_dir": sweep_dir, "parent_run_id": parent_run_id}
