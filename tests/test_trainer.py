"""The TorchTrainer around the loop, on a real local Ray cluster with real demo shards.

- A worker killed mid-run is restarted by Ray Train from the latest checkpoint, and
  the run ends at the same step with the very losses of an uninterrupted run.
- Re-running the same storage_path/run_name resumes and keeps the latest checkpoints;
  fresh_start moves the old run aside (nothing deleted) and starts from step 0, and a
  run completes with its MLflow server unreachable from start to end.
- The cluster presets assemble into the TorchTrainer they describe.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import ray
import torch

from clip_ray.config import Config, from_dict, load_config
from clip_ray.train.context import WorkerContext
from clip_ray.train.demo import prepare_demo
from clip_ray.train.inputs import prepare_config
from clip_ray.train.loop import run_training
from clip_ray.train.trainer import RunDirectory, build_trainer, train
from train_job_helpers import REPO_ROOT, free_port, tiny_config, tiny_demo_config

STEPS = 12


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as env:
        # A loopback test cluster: no token (ray.init would otherwise turn token auth on for
        # this process and every later one it starts).
        env.setenv("RAY_AUTH_MODE", "disabled")
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        # Ray Train's controller takes one report every poll (2 s by default); these runs report every step.
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        ray.init(address="local", num_cpus=3, include_dashboard=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return {"root": root, "storage": root / "runs", "mlflow": f"sqlite:///{root}/mlflow.db",
            "demo_data": root / "demo-data"}


def job_config(workspace, run_name: str, steps: int = STEPS, **sections) -> Config:
    """The tiny job on the demo shards, without validation or zero-shot data (nothing to evaluate)."""
    raw = tiny_config(workspace["storage"], run_name, steps, workspace["mlflow"], **sections)
    raw["demo"] = vars(tiny_demo_config())
    config, _ = prepare_demo(from_dict(Config, raw), workspace["demo_data"])
    config.data.val, config.data.zeroshot_dir = [], None
    return prepare_config(config)


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(json.loads((p / "manifest.json").read_text())["step"]
                  for p in directory.glob("checkpoint_*") if p.is_dir())


@pytest.fixture(scope="module")
def reference_losses(ray_cluster, workspace) -> dict[int, float]:
    """train/loss per step of the uninterrupted run, in-process with the one torch thread a
    Ray worker with one CPU gets, so the arithmetic is the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        context = WorkerContext(checkpoint_root=workspace["root"] / "reference", keep_checkpoints=1)
        run_training(job_config(workspace, "reference"), context)
    finally:
        torch.set_num_threads(threads)
    return {int(m["step"]): m["train/loss"] for m in context.reported}


def _train_worker_pids() -> list[int]:
    """Ray Train workers of this test's cluster: Ray started it from this process, so they descend from it."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


def _wait_for_checkpoint(run: RunDirectory, step: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            latest = run.latest_checkpoint()
        except ValueError:  # the snapshot is being rewritten
            latest = None
        if latest and latest.get("step", 0) >= step:
            return int(latest["step"])
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step >= {step} in {run.path} within {timeout_s} s")


@pytest.fixture(scope="module")
def killed_run(ray_cluster, workspace) -> dict:
    """A run whose only worker is SIGKILLed after its checkpoint at step 3 or later."""
    config = job_config(workspace, "killed", cluster={"max_failures": 1})
    outcome: dict = {}

    def run_job():
        try:
            outcome["outcome"] = train(config)
        except BaseException as err:  # handed to the test thread
            outcome["error"] = err

    job = threading.Thread(target=run_job)
    job.start()
    outcome["killed_after"] = _wait_for_checkpoint(RunDirectory(str(workspace["storage"]), "killed"), 3, 180)
    outcome["victims"] = _train_worker_pids()
    for pid in outcome["victims"]:
        os.kill(pid, signal.SIGKILL)
    job.join(timeout=300)
    assert not job.is_alive() and "error" not in outcome, outcome.get("error")
    return outcome


@pytest.mark.timeout(400)
def test_a_killed_worker_restarts_from_its_checkpoint_with_the_same_losses(killed_run, reference_losses):
    outcome, killed_after = killed_run["outcome"], killed_run["killed_after"]
    assert len(killed_run["victims"]) == 1, killed_run["victims"]
    assert killed_after < STEPS, "the worker finished before it could be killed"
    assert outcome.result.error is None and outcome.summary["step"] == STEPS, "restarted and finished"

    # Every report reached Ray Train once or, for a step redone after the restart, twice.
    losses = {int(m["step"]): m["train/loss"] for _, m in outcome.result.best_checkpoints}
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(reference_losses)
    # fp32 on CPU, the same data order, the RNG restored: the same numbers, not merely close ones.
    for step in range(killed_after + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference_losses[step], rel=0, abs=1e-6), step


@pytest.mark.timeout(400)
def test_rerunning_a_run_resumes_it_and_fresh_start_moves_it_aside(killed_run, workspace, caplog, capfd):
    caplog.set_level("INFO", logger="clip_ray")
    # The same name, more steps, fewer checkpoints kept: it continues where it ended.
    longer = train(job_config(workspace, "killed", steps=STEPS + 2, train={"keep_checkpoints": 2}))
    assert longer.resumed_from_step == STEPS and longer.summary["step"] == STEPS + 2
    assert f"resuming run killed from step {STEPS} of {STEPS + 2}" in caplog.text
    kept = checkpoint_steps(Path(longer.run_path))
    # Ray keeps the latest train.keep_checkpoints of the checkpoints it registered. Checkpoints that
    # were uploaded but not yet registered when the worker was killed are not pruned either.
    assert kept[-2:] == [STEPS + 1, STEPS + 2]
    assert all(killed_run["killed_after"] < step <= STEPS for step in kept[:-2]), kept

    # Starting over, with MLflow unreachable from start to end: the old run is moved, the new one completes.
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    fresh = train(job_config(workspace, "killed", steps=1, cluster={"fresh_start": True},
                             tracking={"tracking_uri": dead_mlflow}))
    assert fresh.resumed_from_step is None and fresh.summary["step"] == 1
    assert Path(fresh.moved_aside_to).name.startswith("killed.moved-")
    assert checkpoint_steps(Path(fresh.moved_aside_to)) == kept, "the old run was moved, not deleted"
    assert checkpoint_steps(Path(fresh.run_path)) == [1]
    assert "fresh start: moved the previous run killed aside" in caplog.text
    # The job said MLflow was away (Ray forwards the worker's log) and finished regardless.
    assert f"MLflow at {dead_mlflow} is not reachable" in capfd.readouterr().out
    assert fresh.mlflow_run_id is None


@pytest.mark.parametrize("name", ["vit-b32-cluster.yaml", "rn50-cluster.yaml"])
def test_cluster_presets_assemble_into_the_trainer_they_describe(name):
    config = load_config(REPO_ROOT / "configs" / name)
    trainer = build_trainer(config)
    scaling, run = trainer.scaling_config, trainer.run_config
    assert scaling.num_workers == 64 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 2, "GPU": 1}
    assert run.storage_path == "s3://clip-ray-runs/checkpoints" and run.name == config.cluster.run_name
    # No score attribute: Ray keeps the latest num_to_keep checkpoints, in the order reported.
    assert run.checkpoint_config.num_to_keep == 3 and run.checkpoint_config.checkpoint_score_attribute is None
    assert run.failure_config.max_failures == 10
    shipped = from_dict(Config, trainer.train_loop_config["config"])
    assert shipped.train.global_batch_size == 32768 and shipped.model == config.model


def test_fractional_cpus_reach_the_workers(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "demo-cpu.yaml",
                         ["cluster.cpus_per_worker=0.5", "cluster.num_workers=2", f"data.tokenizer={tmp_path}/t.json"])
    scaling = build_trainer(config).scaling_config
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 0.5}
