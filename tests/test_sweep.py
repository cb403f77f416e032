"""Scaling sweeps with Ray Tune, end to end through `python tune/sweep.py`.

Each sweep runs as its own process with its own local Ray (as a user runs it), on
real demo shards, with an MLflow SQLite store under the test's tmp_path:

- a 2 x 2 sweep (widths x samples seen, two trials at a time) is killed, driver and local cluster, once
  its first trial has finished, and run again: the finished trial is not trained
  again, the sweep completes, and it leaves the results table, the learning curves,
  the plots and one MLflow parent run with a child per trial;
- an ASHA sweep over learning rates stops the trial that trails at the first rung,
  and the trial after it still starts and runs (Ray's dashboard is up for ASHA).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from repo_paths import REPO_ROOT
from train_job_helpers import TINY_DEMO, tiny_config, write_config

from clip_ray.config import ConfigError, load_sweep_config
from clip_ray.driver.sweep.trials import (
    learning_curves, param_space, search_algorithm, space_values, trial_config, trial_key,
)
from clip_ray.model import model_stats, scale_model

BATCH = 32
BUDGET = 1e13  # FLOPs: thousands of times the largest trial of the grid sweep
# Ray Train's controller takes one report per poll (2 s by default) and a worker blocks until its report is
# taken: these trials report every few steps. The preemption watcher (an actor process per Ray Train run) only
# acts when a cloud node is drained, which never happens here.
FAST_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def sweep_files(root: Path, name: str, **sweep) -> Path:
    """A tiny base job (demo section: the sweep draws its data) and a sweep file over it."""
    job = tiny_config(root / "unused", "unused", 10, f"sqlite:///{root}/mlflow.db")
    job["demo"] = dict(TINY_DEMO)
    job["train"].update({"log_every": 5, "keep_checkpoints": 2})
    job["cluster"]["cpus_per_worker"] = 0.8  # the trial's driver and Ray Data need CPU too, on 2 CPUs
    write_config(job, root / "job.yaml")
    section = {"name": name, "storage_path": str(root / "sweeps"), "evals_per_trial": 2, **sweep}
    return write_config({"base": "job.yaml", "sweep": section}, root / f"{name}.yaml")


def sweep_command(config: Path, root: Path, num_cpus: int = 2) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "tune" / "sweep.py"), "--config", str(config),
            "--demo-data-dir", str(root / "demo-data"), "--num-cpus", str(num_cpus)]


def sweep_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", **FAST_RAY_TRAIN})
    return env


def run_to_end(config: Path, root: Path, log: Path, timeout_s: float = 900, num_cpus: int = 2) -> str:
    with log.open("a") as out:
        done = subprocess.run(sweep_command(config, root, num_cpus), stdout=out, stderr=subprocess.STDOUT, env=sweep_env(),
                              timeout=timeout_s, cwd=root)
    text = log.read_text()
    assert done.returncode == 0, text[-4000:]
    return text


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the sweep's driver and every process it started (its local Ray cluster included)."""
    tree = [process.pid] + [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    psutil.wait_procs([psutil.Process(pid) for pid in tree if psutil.pid_exists(pid)], timeout=30)


def records(sweep_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (sweep_dir / "trials").glob("*.json")}


# --------------------------------------------------------------------------- the sweep file


def test_sweep_file_errors_name_the_culprit(tmp_path):
    config = sweep_files(tmp_path, "bad", width_multipliers=[1, 2])
    loaded = load_sweep_config(config, ["sweep.samples_seen=[64, 128]", "train.lr=0.002"])
    assert loaded.sweep.samples_seen == [64, 128] and loaded.base.train.lr == 0.002
    with pytest.raises(ConfigError, match=r"sweep.width_multipliers"):
        load_sweep_config(config, ["sweep.width_multipliers=[0]"])
    with pytest.raises(ConfigError, match=r"sweep.colour: unknown key"):
        load_sweep_config(config, ["sweep.colour=red"])
    (tmp_path / "nobase.yaml").write_text(yaml.safe_dump({"sweep": {"name": "x"}}))
    with pytest.raises(ConfigError, match="base: is required"):
        load_sweep_config(tmp_path / "nobase.yaml")


@pytest.mark.parametrize("name", ["sweep-demo-cpu.yaml", "sweep-flickr8k-cpu.yaml", "sweep-vit-cluster.yaml"])
def test_sweep_presets_give_a_valid_job_at_every_point(name):
    file = load_sweep_config(REPO_ROOT / "configs" / name)
    values = space_values(file.sweep, file.base)
    assert len(values["width_multiplier"]) >= 3 and len(values["samples_seen"]) >= 3
    sizes = []
    for width, samples, lr in itertools.product(*values.values()):
        params = {"width_multiplier": width, "samples_seen": samples, "lr": lr}
        config = trial_config(file.base, file.sweep, params, trial_key(params), "/sweeps/runs", "parent")
        assert config.train.steps * config.train.global_batch_size >= samples
        assert config.train.eval_every * file.sweep.evals_per_trial <= config.train.steps
        assert config.tracking.parent_run_id == "parent" and not config.tracking.log_model
        sizes.append(sum(model_stats(config.model)[k] for k in ("params_vision", "params_text")))
    assert sizes == sorted(sizes), "parameters grow with the width multiplier"
    if name == "sweep-vit-cluster.yaml":  # 8 trials x 8 GPUs: the 64-GPU cluster of the presets
        assert file.base.cluster.num_workers * file.sweep.max_concurrent_trials == 64
        assert file.base.cluster.use_gpu and file.sweep.storage_path.startswith("s3://")
        assert min(values["samples_seen"]) == 3_000_000 and max(values["samples_seen"]) == 128_000_000


def drawn_points(config: Path, **sweep) -> list[tuple]:
    """The points Ray Tune's own generator hands out for this sweep file (no trial runs; no concurrency
    limit, which would hold back the points after the first until it finished)."""
    from ray.tune.experiment import Experiment

    sweep = {"max_concurrent_trials": 1000, **sweep}
    file = load_sweep_config(config, [f"sweep.{k}={v}" for k, v in sweep.items()])
    generator = search_algorithm(file.sweep)
    generator.add_configurations([Experiment(file.sweep.name, lambda params: None,
                                             config=param_space(file.sweep, file.base),
                                             num_samples=file.sweep.num_samples,
                                             storage_path=str(config.parent / "tune"))])
    points = []
    while (trial := generator.next_trial()) is not None:
        points.append((trial.config["width_multiplier"], trial.config["samples_seen"], trial.config["lr"]))
    return points


def test_random_search_draws_from_the_lists_and_the_seed_repeats_them(tmp_path):
    lists = {"width_multipliers": [0.5, 1, 2], "samples_seen": [160, 320], "lrs": [1e-3, 3e-3]}
    config = sweep_files(tmp_path, "random", search="random", num_samples=12, **lists)
    first, again, other = drawn_points(config), drawn_points(config), drawn_points(config, seed=1)
    assert len(first) == 12 and first == again and first != other
    for width, samples, lr in first + other:
        assert width in lists["width_multipliers"] and samples in lists["samples_seen"] and lr in lists["lrs"]
    assert all(len(set(axis)) > 1 for axis in zip(*first)), "draws vary along each axis"
    # Grid search (num_samples repeats) walks every combination, whatever the seed.
    grid = drawn_points(config, search="grid", num_samples=2, seed=5)
    assert sorted(grid) == sorted(list(itertools.product([0.5, 1.0, 2.0], [160, 320], [1e-3, 3e-3])) * 2)


# --------------------------------------------------------------------------- 2 x 2, interrupted and resumed


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    # Two trials at a time: a trial is mostly start-up and waiting (a Ray Train run of 5-10 tiny steps), so
    # two overlap well on two cores. Four logical CPUs fit two trials' workers (0.8 each) and their decoding.
    config = sweep_files(root, "grid", width_multipliers=[1, 2], samples_seen=[5 * BATCH, 10 * BATCH],
                         budget=BUDGET, max_concurrent_trials=2)
    sweep_dir = root / "sweeps" / "grid"
    log = root / "sweep.log"
    with log.open("w") as out:
        first = subprocess.Popen(sweep_command(config, root, num_cpus=4), stdout=out, stderr=subprocess.STDOUT,
                                 env=sweep_env(), cwd=root, start_new_session=True)
    deadline = time.monotonic() + 600
    while not records(sweep_dir) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, "the sweep ended before it could be interrupted:\n" + log.read_text()[-3000:]
    before = records(sweep_dir)
    assert len(before) >= 1, "no trial finished within 600 s:\n" + log.read_text()[-3000:]
    kill_tree(first)
    killed_at = len(log.read_text())
    text = run_to_end(config, root, log, num_cpus=4)
    return {"root": root, "sweep_dir": sweep_dir, "before": before, "second_log": text[killed_at:],
            "uri": f"sqlite:///{root}/mlflow.db"}


@pytest.mark.timeout(1500)
def test_an_interrupted_sweep_resumes_without_retraining_finished_trials(resumed_sweep):
    sweep_dir, before = resumed_sweep["sweep_dir"], resumed_sweep["before"]
    assert "resuming sweep grid" in resumed_sweep["second_log"]
    after = records(sweep_dir)
    assert len(after) == 4, sorted(after)
    for name, record in before.items():
        assert after[name]["finished_at"] == record["finished_at"], f"{name} was trained again"
        # Its Ray Train run was not started a second time either.
        assert f"starting fresh run {name}" not in resumed_sweep["second_log"]
        assert f"resuming run {name}" not in resumed_sweep["second_log"]
    # Each trial has exactly one MLflow run under the one parent.
    client = MlflowClient(resumed_sweep["uri"])
    parents = client.search_runs(client.get_experiment_by_name("tests").experiment_id,
                                 filter_string="attributes.run_name = 'grid'")
    assert len(parents) == 1
    children = client.search_runs([parents[0].info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(after)


@pytest.mark.timeout(1500)
def test_a_sweep_leaves_its_table_curves_plots_and_mlflow_runs(resumed_sweep):
    sweep_dir = resumed_sweep["sweep_dir"]
    results = pd.read_parquet(sweep_dir / "results.parquet")
    assert len(results) == 4 and (results["status"] == "finished").all()
    assert pd.read_csv(sweep_dir / "results.csv")["trial_id"].tolist() == results["trial_id"].tolist()
    assert sorted(zip(results["width_multiplier"], results["samples_seen"])) == \
        [(1.0, 160), (1.0, 320), (2.0, 160), (2.0, 320)]

    base = load_sweep_config(resumed_sweep["root"] / "grid.yaml").base.model
    for width in (1.0, 2.0):
        stats = model_stats(scale_model(base, width))
        rows = results[results["width_multiplier"] == width]
        assert (rows["params_vision"] == stats["params_vision"]).all()
        assert (rows["params_text"] == stats["params_text"]).all()
        assert (rows["compute"] == 3.0 * stats["flops_per_sample"] * rows["samples_seen"]).all()
    assert results.loc[results["width_multiplier"] == 2.0, "params"].min() > \
        results.loc[results["width_multiplier"] == 1.0, "params"].max()
    for column in ("val_loss", "zeroshot_top1", "val/image_to_text_R@1", "val/image_to_text_R@5",
                   "val/image_to_text_R@10", "wall_time_s", "unique_samples"):
        assert results[column].notna().all() and (results[column] >= 0).all(), column
    assert (results["val_loss"] > 0).all()

    # Learning curves: val/loss before training, mid-run and at the end of each trial.
    curves = pd.read_parquet(sweep_dir / "curves.parquet")
    val = curves[curves["metric"] == "val/loss"]
    for trial in results.itertuples():
        every = trial.steps // 2  # evals_per_trial=2
        expected = [0, *range(every, trial.steps, every), trial.steps]
        steps = sorted(val.loc[val["trial_id"] == trial.trial_id, "step"])
        assert steps == expected, (trial.trial_id, steps)

    analysis = sweep_dir / "analysis"
    report = json.loads((analysis / "scaling_fit.json").read_text())
    assert report["n_usable"] == 4 and "alpha" in report["power_law"]
    budget = report["budget"]
    assert budget["compute"] == BUDGET and budget["times_largest_run"] == pytest.approx(
        BUDGET / results["compute"].max())
    assert 0 < budget["frontier_error"] < results["val_loss"].min(), "more compute predicts a lower loss"
    plots = sorted(p.name for p in analysis.glob("*.png"))
    assert {"error_vs_compute.png", "learning_curves.png"} <= set(plots)
    for png in analysis.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(resumed_sweep["uri"])
    state = json.loads((sweep_dir / "sweep.json").read_text())
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "scaling")}
    assert {f"scaling/{name}" for name in plots} <= logged
    assert "fit/alpha" in parent.data.metrics
    assert parent.data.metrics["budget/frontier_error"] == pytest.approx(budget["frontier_error"])
    for trial in results.itertuples():
        child = client.get_run(trial.mlflow_run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert child.data.metrics["val/loss"] == pytest.approx(trial.val_loss)


# --------------------------------------------------------------------------- ASHA


STEPS, RUNG = 10, 5  # the ASHA sweep's trials and its first rung, in steps


@pytest.mark.timeout(1200)
def test_asha_stops_the_trailing_trial_and_the_next_one_still_runs(tmp_path):
    # Grid order is the list order: a good rate, a rate too small to learn anything, a good rate.
    # An evaluation at step 5 of 10, rungs at 5 and 10: a trial stopped at the first rung has half of its
    # steps still ahead of it.
    config = sweep_files(tmp_path, "asha", samples_seen=[STEPS * BATCH], lrs=[3e-3, 1e-9, 2e-3], scheduler="asha",
                         asha_grace_samples=RUNG * BATCH, asha_reduction_factor=2, evals_per_trial=2)
    run_to_end(config, tmp_path, tmp_path / "sweep.log")
    results = pd.read_parquet(tmp_path / "sweeps" / "asha" / "results.parquet").set_index("lr")
    assert sorted(results.index) == [1e-9, 2e-3, 3e-3]
    assert results.loc[3e-3, "status"] == "finished" and results.loc[3e-3, "samples_seen"] == STEPS * BATCH
    stopped = results.loc[1e-9]
    assert stopped["status"] == "stopped" and stopped["samples_seen"] == RUNG * BATCH, stopped.to_dict()
    assert stopped["val_loss"] > results.loc[3e-3, "val_loss"]
    # The trial after the stopped one got the freed resources and trained.
    assert results.loc[2e-3, "samples_seen"] >= RUNG * BATCH
    # The stopped trial's MLflow run is ended, not left running.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(stopped["mlflow_run_id"]).info.status == "KILLED"


def test_a_step_evaluated_twice_is_one_point_of_the_learning_curve(tmp_path):
    # A trial killed after its last checkpoint but before its record is evaluated again when the sweep resumes:
    # its MLflow run then holds two val/loss values at that step.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("curves")).info.run_id
    for step, value in ((0, 4.0), (5, 3.5), (5, 3.25)):
        client.log_metric(run_id, "val/loss", value, step=step)
        time.sleep(0.01)  # distinct timestamps: the later value is the later evaluation
    curve = [(p["step"], p["value"]) for p in learning_curves(uri, run_id, BATCH) if p["metric"] == "val/loss"]
    assert curve == [(0, 4.0), (5, 3.25)]
