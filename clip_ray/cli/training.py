"""`clip-ray train|sweep`: a training run, a scaling sweep (`eval` is in clip_ray.cli.evaluate)."""

from __future__ import annotations

import argparse
import sys
import time

from clip_ray.cli.common import add_config_arguments, add_ray_arguments
from clip_ray.config import load_config, load_sweep_config


def add_train_commands(groups: argparse._SubParsersAction) -> None:
    train = groups.add_parser("train", help="train CLIP with Ray Train, tracked in MLflow",
                              description="Train (or resume) one run. Without --config: the demo, which "
                                          "generates its data and finishes in a few minutes on 2 CPU cores.")
    add_config_arguments(train, "configs/demo-cpu.yaml, the demo")
    train.add_argument("--demo-data-dir", default="demo-data",
                       help="where a config with a demo section puts its generated data (default: %(default)s)")
    add_ray_arguments(train)
    train.set_defaults(run=run_train)


def prepare_job_of(args: argparse.Namespace):
    """The prepared job of a train/eval command (clip_ray.driver.prepare): loaded, checked and
    prepared here, once, before Ray starts; a bad value is a ConfigError naming its key."""
    from clip_ray.driver.demo import default_config_path
    from clip_ray.driver.prepare import prepare_job

    return prepare_job(load_config(args.config or default_config_path(), args.overrides), args.demo_data_dir)


def print_train_summary(outcome, dataset=None) -> None:
    """What a person reads at the end of a job: before/after metrics, where the model and the run are."""
    from clip_ray.driver.demo import demo_report
    from clip_ray.eval.report import metrics_table
    from clip_ray.tracking.run import mlflow_run_link, mlflow_ui_hint

    summary = outcome.summary
    resumed = f" (resumed at step {outcome.resumed_from_step})" if outcome.resumed_from_step is not None else ""
    print(f"\nRun {outcome.run_path}: {summary.get('step', '?')} steps, {summary.get('samples_seen', '?')} samples"
          f"{resumed}")
    columns = {"before": outcome.before, "after": outcome.final}
    print(demo_report(*columns.values(), dataset) if dataset is not None else metrics_table(columns))
    print(f"Checkpoint: {outcome.checkpoint_path}")
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    else:
        print(f"MLflow run: none, {outcome.tracking_uri} never answered (metrics are in the checkpoints)")
    print(f"  to browse the runs: {mlflow_ui_hint(outcome.tracking_uri)}")
    if outcome.mlflow_run_id and outcome.mlflow_experiment_id:
        link = mlflow_run_link(outcome.tracking_uri, outcome.mlflow_experiment_id, outcome.mlflow_run_id)
        print(f"  this run: {link}")


def run_train(args: argparse.Namespace) -> int:
    import ray.train

    from clip_ray.driver.trainer import train
    from clip_ray.ray_session import ray_session

    started = time.perf_counter()
    job = prepare_job_of(args)  # before Ray starts: a bad path costs a second, not a cluster start
    with ray_session(args.ray_address, args.num_cpus):
        try:
            outcome = train(job)
        except ray.train.TrainingFailedError as err:
            print(f"clip-ray train: training failed: {err}", file=sys.stderr)
            return 1
    print_train_summary(outcome, job.demo)
    print(f"Wall time: {time.perf_counter() - started:.0f} s")
    return 0


def add_sweep_commands(groups: argparse._SubParsersAction) -> None:
    sweep = groups.add_parser("sweep", help="a scaling sweep: Ray Tune over training jobs, then the fits",
                              description="Trains the base job of a sweep file at every width x data scale "
                                          "(x learning rate) with Ray Tune, then fits scaling laws. Running "
                                          "the same sweep name again resumes it.")
    sweep.add_argument("--config", required=True, help="sweep YAML (e.g. configs/sweep-demo-cpu.yaml)")
    sweep.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                       help="sweep.KEY=VALUE for the sweep section, any other key for the base job")
    sweep.add_argument("--demo-data-dir", default="demo-data", help="demo data of a base job with a demo section")
    add_ray_arguments(sweep)
    sweep.set_defaults(run=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from clip_ray.driver.sweep import run_sweep as run
    from clip_ray.ray_session import ray_session

    started = time.perf_counter()
    file = load_sweep_config(args.config, args.overrides)
    with ray_session(args.ray_address, args.num_cpus):
        outcome = run(file, args.demo_data_dir)
    columns = [c for c in ("trial_id", "params", "samples_seen", "compute", "val_loss", "zeroshot_top1",
                           "wall_time_s", "status") if c in outcome.results]
    print(outcome.results[columns].to_string(index=False) if len(outcome.results) else "no trial finished")
    print(f"Sweep directory: {outcome.sweep_dir} (results.csv, curves.csv, analysis/)")
    if outcome.parent_run_id:
        print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    print(f"Wall time: {time.perf_counter() - started:.0f} s")
    return 1 if outcome.errors else 0
