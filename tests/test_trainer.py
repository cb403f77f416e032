"""The TorchTrainer around the loop: `python jobs/train.py` on its own local Ray cluster, real demo shards.

- A run keeps its latest train.keep_checkpoints checkpoints; re-run with fresh_start, it is
  moved aside (nothing deleted) and the new run starts from step 0, and completes with its
  MLflow server unreachable from start to end. (A re-run without fresh_start resumes:
  tests/test_node_loss.py resubmits a stopped job under the same name.)
- The cluster presets assemble into the TorchTrainer they describe.

(A worker killed mid-run, restarted by Ray Train from the latest checkpoint with the very metrics
of an uninterrupted run: tests/test_node_loss.py, where its whole node goes.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo_paths import REPO_ROOT
from train_job_helpers import free_port, tiny_config, tiny_demo_config

from clip_ray.config import Config, from_dict, load_config, to_dict
from clip_ray.driver.demo import prepare_demo
from clip_ray.driver.prepare import PreparedJob, prepare_job
from clip_ray.driver.trainer import build_trainer

STEPS = 3  # checkpoints at 1, 2 and 3: the first one is dropped, keep_checkpoints being 2


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
    # The preemption watcher (an actor process per run) only acts when a cloud node is drained.
    env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"})
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


@pytest.fixture(scope="module")
def first_run(workspace) -> list[int]:
    """A run of STEPS steps, keeping the latest two of its checkpoints, under the name the next test re-runs.

    (Re-running a name resumes it: tests/test_node_loss.py resubmits a stopped job and compares every metric.)
    """
    run_job(workspace, job_config(workspace, "rerun", train={"keep_checkpoints": 2}), "first")
    return checkpoint_steps(Path(workspace["storage"]) / "rerun")


@pytest.mark.timeout(600)
def test_fresh_start_moves_the_previous_run_aside(first_run, workspace):
    # Ray keeps the latest train.keep_checkpoints of the checkpoints it registered.
    assert first_run == [STEPS - 1, STEPS], first_run
    # Starting over, with MLflow unreachable from start to end: the old run is moved, the new one completes.
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    output = run_job(workspace, job_config(workspace, "rerun", steps=1, cluster={"fresh_start": True},
                                           tracking={"tracking_uri": dead_mlflow, "close_timeout_s": 1.0}), "fresh")
    moved = re.search(r"fresh start: moved the previous run rerun aside to (\S+)", output)
    assert moved and Path(moved.group(1)).name.startswith("rerun.moved-"), output[-3000:]
    assert checkpoint_steps(Path(moved.group(1))) == first_run, "the old run was moved, not deleted"
    assert checkpoint_steps(Path(workspace["storage"]) / "rerun") == [1]
    assert "starting fresh run rerun" in output and "resuming run" not in output
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
