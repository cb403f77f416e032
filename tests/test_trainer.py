"""The TorchTrainer around the loop: `python jobs/train.py` on its own local Ray cluster, real demo shards.

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
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from repo_paths import REPO_ROOT
from train_job_helpers import free_port, tiny_config, tiny_demo_config

from clip_ray.config import Config, from_dict, load_config, to_dict
from clip_ray.driver.demo import prepare_demo
from clip_ray.driver.prepare import PreparedJob, prepare_job
from clip_ray.driver.trainer import RAY_SNAPSHOT_FILE, RunDirectory, build_trainer

STEPS = 12


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
    config.demo = None  # drawn: the job trains on its shards, and nothing fills data.val again
    config.data.val, config.data.zeroshot_dir = [], None
    return prepare_job(config).config


def checkpoint_steps(directory: Path) -> list[int]:
    return sorted(json.loads((p / "manifest.json").read_text())["step"]
                  for p in directory.glob("checkpoint_*") if p.is_dir())


def start_job(workspace, config: Config, log_name: str) -> tuple[subprocess.Popen, Path]:
    """`python jobs/train.py --config` in a process of its own with its own local Ray, as a user runs it.

    (A TorchTrainer fitted from this pytest process, after other modules' Ray sessions in it,
    had its controller actor cancelled before it ran; a job is a process of its own anyway.)
    """
    config_file = workspace["root"] / f"{log_name}.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    log = workspace["root"] / f"{log_name}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    # Ray Train's controller takes one report every poll (2 s by default); these runs report every step.
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
    with log.open("w") as out:
        job = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "train.py"), "--config", str(config_file),
                                "--num-cpus", "3"], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workspace["root"])
    return job, log


def run_job(workspace, config: Config, log_name: str) -> str:
    job, log = start_job(workspace, config, log_name)
    job.wait(timeout=400)
    output = log.read_text()
    assert job.returncode == 0, output[-5000:]
    return output


def _train_worker_pids(job: subprocess.Popen) -> list[int]:
    """Ray Train workers of the job's local cluster: they descend from the job's process."""
    pids = []
    for process in psutil.Process(job.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:
            continue
    return pids


def _wait_for_checkpoint(run: RunDirectory, step: int, timeout_s: float, job: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the run ended before a checkpoint at step {step}:\n{log.read_text()[-5000:]}"
        try:
            latest = run.latest_checkpoint()
        except ValueError:  # the snapshot is being rewritten
            latest = None
        if latest and latest.get("step", 0) >= step:
            return int(latest["step"])
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint at step >= {step} in {run.path} within {timeout_s} s:\n"
                       f"{log.read_text()[-5000:]}")


def reported_losses(run: RunDirectory) -> dict[int, float]:
    """train/loss of every checkpoint report Ray Train kept for the run (its checkpoint manager's snapshot)."""
    snapshot = json.loads((Path(run.path) / RAY_SNAPSHOT_FILE).read_text())
    return {int(r["metrics"]["step"]): r["metrics"]["train/loss"] for r in snapshot["checkpoint_results"]}


@pytest.fixture(scope="module")
def reference_losses(workspace) -> dict[int, float]:
    """train/loss per step of the same job run without interruption."""
    run_job(workspace, job_config(workspace, "reference"), "reference")
    return reported_losses(RunDirectory(str(workspace["storage"]), "reference"))


@pytest.fixture(scope="module")
def killed_run(workspace) -> dict:
    """A run whose only worker is SIGKILLed after its checkpoint at step 3 or later."""
    config = job_config(workspace, "killed", cluster={"max_failures": 1})
    run = RunDirectory(str(workspace["storage"]), "killed")
    job, log = start_job(workspace, config, "killed")
    try:
        killed_after = _wait_for_checkpoint(run, 3, 300, job, log)
        victims = _train_worker_pids(job)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        job.wait(timeout=300)
    finally:
        if job.poll() is None:
            job.kill()
    output = log.read_text()
    assert job.returncode == 0, output[-5000:]
    return {"killed_after": killed_after, "victims": victims, "output": output, "losses": reported_losses(run)}


@pytest.mark.timeout(600)
def test_a_killed_worker_restarts_from_its_checkpoint_with_the_same_losses(killed_run, reference_losses):
    killed_after = killed_run["killed_after"]
    assert len(killed_run["victims"]) == 1, killed_run["victims"]
    assert killed_after < STEPS, "the worker finished before it could be killed"
    assert re.search(rf"Run \S+/killed: {STEPS} steps", killed_run["output"]), "restarted and finished"

    # Every report reached Ray Train once or, for a step redone after the restart, twice.
    losses = killed_run["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(reference_losses)
    # fp32 on CPU, the same data order, the RNG restored: the same numbers, not merely close ones.
    for step in range(killed_after + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference_losses[step], rel=0, abs=1e-6), step


@pytest.mark.timeout(600)
def test_rerunning_a_run_resumes_it_and_fresh_start_moves_it_aside(killed_run, workspace):
    # The same name, more steps, fewer checkpoints kept: it continues where it ended.
    output = run_job(workspace, job_config(workspace, "killed", steps=STEPS + 2, train={"keep_checkpoints": 2}),
                     "longer")
    assert f"resuming run killed from step {STEPS} of {STEPS + 2}" in output
    assert re.search(rf"Run (\S+)/killed: {STEPS + 2} steps, \d+ samples \(resumed at step {STEPS}\)", output)
    run_path = Path(workspace["storage"]) / "killed"
    kept = checkpoint_steps(run_path)
    # Ray keeps the latest train.keep_checkpoints of the checkpoints it registered. Checkpoints that
    # were uploaded but not yet registered when the worker was killed are not pruned either.
    assert kept[-2:] == [STEPS + 1, STEPS + 2]
    assert all(killed_run["killed_after"] < step <= STEPS for step in kept[:-2]), kept

    # Starting over, with MLflow unreachable from start to end: the old run is moved, the new one completes.
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    output = run_job(workspace, job_config(workspace, "killed", steps=1, cluster={"fresh_start": True},
                                           tracking={"tracking_uri": dead_mlflow}), "fresh")
    moved = re.search(r"fresh start: moved the previous run killed aside to (\S+)", output)
    assert moved and Path(moved.group(1)).name.startswith("killed.moved-"), output[-3000:]
    assert checkpoint_steps(Path(moved.group(1))) == kept, "the old run was moved, not deleted"
    assert checkpoint_steps(run_path) == [1]
    assert "starting fresh run killed" in output and "resuming run" not in output
    # The job said MLflow was away (Ray forwards the worker's log) and finished regardless.
    assert f"MLflow at {dead_mlflow} is not reachable" in output
    assert "MLflow run: none" in output


@pytest.mark.parametrize("name", ["vit-b32-cluster.yaml", "rn50-cluster.yaml"])
def test_cluster_presets_assemble_into_the_trainer_they_describe(name):
    config = load_config(REPO_ROOT / "configs" / name)
    trainer = build_trainer(PreparedJob(config))
    scaling, run = trainer.scaling_config, trainer.run_config
    assert scaling.num_workers == 64 and scaling.use_gpu
    assert scaling.resources_per_worker == {"CPU": 2, "GPU": 1, "trainer": 1}  # node role: GPU nodes only
    assert run.storage_path == "s3://clip-ray-runs/checkpoints" and run.name == config.cluster.run_name
    # No score attribute: Ray keeps the latest num_to_keep checkpoints, in the order reported.
    assert run.checkpoint_config.num_to_keep == 3 and run.checkpoint_config.checkpoint_score_attribute is None
    assert run.failure_config.max_failures == 10
    shipped = trainer.train_loop_config["config"]
    assert isinstance(shipped, Config), "the workers get the prepared Config itself, nothing to parse or check"
    assert shipped.train.global_batch_size == 32768 and shipped.model == config.model


def test_fractional_cpus_reach_the_workers(tmp_path):
    config = load_config(REPO_ROOT / "configs" / "demo-cpu.yaml",
                         ["cluster.cpus_per_worker=0.5", "cluster.num_workers=2", f"data.tokenizer={tmp_path}/t.json"])
    scaling = build_trainer(PreparedJob(config)).scaling_config
    assert scaling.num_workers == 2 and scaling.resources_per_worker == {"CPU": 0.5}
