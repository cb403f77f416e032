"""A scaling sweep, start to end: Ray Tune over training jobs, then the scaling-law analysis.

    sweep file -> base job made ready once on the driver (demo data, BPE tokenizer, paths)
               -> MLflow parent run (its id kept in <sweep dir>/sweep.json, so a restart reuses it)
               -> Tuner (new) or Tuner.restore (the experiment exists): trials as in trials.py
               -> results.parquet/.csv + curves.parquet/.csv in the sweep directory
               -> clip_ray.scaling.analyze -> plots and scaling_fit.json, logged to the parent run

The sweep directory is <storage_path>/<name>. It holds Ray Tune's experiment state, the
trials' Ray Train runs (runs/), their records (trials/), the tables and analysis/.
Running the same name again resumes: Tune restores its experiment, finished trials
stay finished, an interrupted trial's Ray Train run resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from clip_ray.config import Config, TrackingConfig, to_dict
from clip_ray.config.sweep import SweepFile
from clip_ray.driver.prepare import prepare_job
from clip_ray.driver.sweep.trials import (
    RECORDS_DIR, RUNS_DIR, learning_curves, param_space, read_record, run_trial, search_algorithm, setup_payload,
    trial_config, trial_key, trial_row,
)
from clip_ray.scaling import analyze, format_summary
from clip_ray.storage import is_uri, join, local_absolute, resolve, write_file
from clip_ray.tracking.tracker import Tracker

log = logging.getLogger("clip_ray.driver.sweep")

STATE_FILE = "sweep.json"
ANALYSIS_DIR = "analysis"


@dataclass
class SweepOutcome:
    sweep_dir: str
    results: pd.DataFrame
    curves: pd.DataFrame
    tracking_uri: str
    parent_run_id: str | None
    resumed: bool
    report: dict | None = None
    # Trials Tune reported as errored (their records are absent): name -> error text.
    errors: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the sweep directory


def _read_json(path: str) -> dict:
    return read_record(path) or {}


def prepare_base(file: SweepFile, sweep_dir: str, demo_data_dir: str | Path) -> Config:
    """The base job ready for every trial: demo data drawn, BPE trained (kept in the sweep), paths absolute."""
    base = copy.deepcopy(file.base)
    base.cluster.storage_path = join(sweep_dir, RUNS_DIR)
    base = prepare_job(base, demo_data_dir).config
    base.demo = None  # drawn once here; the trials read the shards
    return base


def _open_parent_run(base: Config, file: SweepFile, state: dict):
    """The sweep's MLflow parent run (resumed when sweep.json names one); a sweep goes on without MLflow."""
    tracking = TrackingConfig(tracking_uri=base.tracking.tracking_uri, experiment=base.tracking.experiment,
                              run_name=file.sweep.name, log_system_metrics=False,
                              retry_interval_s=base.tracking.retry_interval_s,
                              close_timeout_s=base.tracking.close_timeout_s)
    parent = Tracker(tracking, {"sweep": to_dict(file.sweep), "base": to_dict(base)},
                     resume_run_id=state.get("parent_run_id"))
    if not parent.flush(timeout_s=30) or parent.run_id is None:
        log.warning("MLflow at %s did not answer: the trials run without a parent run", parent.uri)
    return parent


# --------------------------------------------------------------------------- Ray Tune


def _scheduler(file: SweepFile, base: Config):
    sweep = file.sweep
    if sweep.scheduler == "fifo":
        return FIFOScheduler()
    samples = sweep.samples_seen or [base.train.steps * base.train.global_batch_size]
    return ASHAScheduler(time_attr="samples_seen", metric=sweep.metric, mode=sweep.mode, max_t=max(samples),
                         grace_period=sweep.asha_grace_samples, reduction_factor=sweep.asha_reduction_factor)


def _tuner(file: SweepFile, base: Config, storage: str, trainable):
    """A new Tuner, or the restored one when the experiment exists (finished trials are kept)."""
    sweep = file.sweep
    experiment = join(storage, sweep.name)
    if tune.Tuner.can_restore(experiment):
        log.info("resuming sweep %s from %s: finished trials are kept, unfinished ones go on", sweep.name, experiment)
        return tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True), True
    tune_config = tune.TuneConfig(scheduler=_scheduler(file, base), search_alg=search_algorithm(sweep),
                                  num_samples=sweep.num_samples)
    run_config = tune.RunConfig(name=sweep.name, storage_path=storage,
                                failure_config=tune.FailureConfig(max_failures=sweep.max_trial_failures))
    return tune.Tuner(trainable, param_space=param_space(sweep, base), tune_config=tune_config,
                      run_config=run_config), False


# --------------------------------------------------------------------------- results


def _child_runs(tracking_uri: str, parent_run_id: str | None) -> dict[str, object]:
    """The parent's child runs by name (empty when MLflow is away)."""
    if not parent_run_id:
        return {}
    try:
        client = MlflowClient(tracking_uri)
        parent = client.get_run(parent_run_id)
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    except Exception as err:  # noqa: BLE001 - the tables are built from the records alone
        log.warning("MLflow child runs of %s not listed: %s", parent_run_id, err)
        return {}
    return {run.info.run_name: run for run in runs}


def _unfinished_record(result, file: SweepFile, base: Config, sweep_dir: str, children: dict) -> dict | None:
    """A row for a trial that ended without a record: stopped by ASHA (or errored) after some evaluations."""
    metrics = result.metrics or {}
    if file.sweep.metric not in metrics or "trial_id" not in metrics:
        return None
    params = {k: result.config[k] for k in ("width_multiplier", "samples_seen", "lr")}
    name = f"{trial_key(params)}-{metrics['trial_id']}"
    config = trial_config(base, file.sweep, params, name, join(sweep_dir, RUNS_DIR), None)
    record = trial_row(name, params, config, metrics, metrics, metrics.get("time_total_s", float("nan")),
                       "errored" if result.error is not None else "stopped")
    child = children.get(name)
    if child is not None:
        record["mlflow_run_id"] = child.info.run_id
        record["curves"] = learning_curves(base.tracking.tracking_uri, child.info.run_id,
                                           config.train.global_batch_size)
        if child.info.status == "RUNNING":  # its worker was stopped before it could end the run
            MlflowClient(base.tracking.tracking_uri).set_terminated(child.info.run_id, "KILLED")
    return record


def collect_results(grid, file: SweepFile, base: Config, sweep_dir: str,
                    parent_run_id: str | None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, str]]:
    """(results, curves, errors): one row per trial from its record, or from Tune's last result."""
    fs, records_path = resolve(join(sweep_dir, RECORDS_DIR))
    records = {}
    for info in fs.get_file_info(pafs.FileSelector(records_path, allow_not_found=True)):
        if info.path.endswith(".json"):
            record = _read_json(join(join(sweep_dir, RECORDS_DIR), info.base_name))
            records[record["trial_id"]] = record
    children = _child_runs(base.tracking.tracking_uri, parent_run_id)
    errors = {}
    for result in grid:
        row = None
        if result.config and "trial_id" in (result.metrics or {}):
            params = {k: result.config[k] for k in ("width_multiplier", "samples_seen", "lr")}
            name = f"{trial_key(params)}-{result.metrics['trial_id']}"
            if name in records:
                continue
            row = _unfinished_record(result, file, base, sweep_dir, children)
        if result.error is not None:
            errors[str(result.path)] = [line for line in str(result.error).splitlines() if line.strip()][-1][:500]
        if row is not None:
            records[row["trial_id"]] = row
    curves = [{"trial_id": name, **point} for name, record in records.items() for point in record.get("curves", [])]
    results = pd.DataFrame([{k: v for k, v in r.items() if k != "curves"} for r in records.values()])
    if not results.empty:
        results = results.sort_values(["compute", "trial_id"]).reset_index(drop=True)
    curve_table = pd.DataFrame(curves, columns=["trial_id", "step", "samples_seen", "metric", "value"])
    return results, curve_table, errors


def _write_tables(sweep_dir: str, results: pd.DataFrame, curves: pd.DataFrame) -> None:
    for name, table in (("results", results), ("curves", curves)):
        write_file(join(sweep_dir, f"{name}.csv"), table.to_csv(index=False).encode())
        write_file(join(sweep_dir, f"{name}.parquet"), table.to_parquet(index=False))


def _analyze(file: SweepFile, sweep_dir: str, results: pd.DataFrame, curves: pd.DataFrame, parent) -> dict | None:
    """The scaling analysis into <sweep dir>/analysis, its plots and JSON logged to the parent run."""
    local = sweep_dir if not is_uri(sweep_dir) else tempfile.mkdtemp(prefix="clip-ray-analysis-")
    out_dir = Path(local) / ANALYSIS_DIR
    try:
        report = analyze(results, out_dir, metric=file.sweep.metric, budget=file.sweep.budget,
                         curves=curves if not curves.empty else None, seed=file.sweep.seed)
    except (ValueError, KeyError) as err:
        log.warning("no scaling analysis of sweep %s: %s", file.sweep.name, err)
        return None
    if local != sweep_dir:
        fs, path = resolve(join(sweep_dir, ANALYSIS_DIR))
        pafs.copy_files(str(out_dir), path, destination_filesystem=fs)
    print(format_summary(report))
    for path in report["plots"].values():
        parent.log_artifact(path, "scaling")
    parent.log_artifact(report["json"], "scaling")
    power = report.get("power_law", {})
    fit_metrics = {f"fit/{k}": v for k, v in power.items() if isinstance(v, (int, float))}
    budget = report.get("budget", {})
    budget_metrics = {f"budget/{k}": v for k, v in budget.items() if isinstance(v, (int, float))}
    parent.log_metrics({**fit_metrics, **budget_metrics, "sweep/trials": len(results)}, step=0)
    return report


# --------------------------------------------------------------------------- the sweep


def run_sweep(file: SweepFile, demo_data_dir: str | Path = "demo-data") -> SweepOutcome:
    """Runs (or resumes) the sweep on the connected Ray cluster and analyses it."""
    # Tune's TensorBoard logger renames every metric with '@' in it, at INFO, on every report.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    sweep = file.sweep
    storage = local_absolute(sweep.storage_path)
    sweep_dir = join(storage, sweep.name)
    base = prepare_base(file, sweep_dir, demo_data_dir)
    state_path = join(sweep_dir, STATE_FILE)
    state = _read_json(state_path)
    parent = _open_parent_run(base, file, state)
    status = "FAILED"
    try:
        if parent.run_id:
            state["parent_run_id"] = parent.run_id
        write_file(state_path, json.dumps({**state, "tracking_uri": base.tracking.tracking_uri,
                                           "sweep": to_dict(sweep)}, indent=2).encode())
        payload = setup_payload(base, sweep, sweep_dir, parent.run_id)
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=payload),
                                        {"cpu": sweep.trial_driver_cpus})
        tuner, resumed = _tuner(file, base, storage, trainable)
        grid = tuner.fit()
        results, curves, errors = collect_results(grid, file, base, sweep_dir, parent.run_id)
        _write_tables(sweep_dir, results, curves)
        parent.log_artifact(_local_copy(join(sweep_dir, "results.csv")), "tables")
        report = _analyze(file, sweep_dir, results, curves, parent) if len(results) else None
        for trial, error in errors.items():
            log.error("trial %s failed: %s", trial, error)
        status = "FINISHED"
    finally:
        parent.close(status, timeout_s=base.tracking.close_timeout_s)
    return SweepOutcome(sweep_dir=sweep_dir, results=results, curves=curves, tracking_uri=base.tracking.tracking_uri,
                        parent_run_id=parent.run_id, resumed=resumed, report=report, errors=errors)


def _local_copy(path: str) -> str:
    """A local file with the content of `path` (itself when it is local)."""
    if not is_uri(path):
        return path
    fs, fs_path = resolve(path)
    local = Path(tempfile.mkdtemp(prefix="clip-ray-sweep-")) / fs_path.rsplit("/", 1)[-1]
    with fs.open_input_stream(fs_path) as stream:
        local.write_bytes(stream.read())
    return str(local)
