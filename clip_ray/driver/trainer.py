"""One training job as a Ray Train TorchTrainer, assembled from the config alone.

The driver does what must happen once and before any worker starts:

    PreparedJob (prepare.prepare_job: paths, MLflow URI, tokenizer, inputs checked)
        -> the run's directory, storage_path/run_name: resume it, or move it aside
        -> TorchTrainer(N workers x resources, each running worker.loop.run_training) -> fit
        -> TrainOutcome

Resume is Ray Train V2's: a run directory keeps `checkpoint_manager_snapshot.json`,
and a trainer with the same storage_path and name loads it and hands the latest
checkpoint to `ray.train.get_checkpoint()`; the loop restores from it exactly. The
driver reads the same snapshot to say which of the two is about to happen.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from clip_ray.driver.prepare import PreparedJob
from clip_ray.inference.models import RAY_SNAPSHOT_FILE, ray_train_latest_checkpoint  # noqa: F401 (tests read it here)
from clip_ray.storage import basename, join, resolve
from clip_ray.worker.entry import train_worker

log = logging.getLogger("clip_ray.trainer")


# --------------------------------------------------------------------------- the run directory


@dataclass
class RunDirectory:
    """storage_path/run_name, on any filesystem pyarrow knows (local, s3://, gs://)."""

    storage_path: str
    run_name: str

    @property
    def path(self) -> str:
        return join(self.storage_path, self.run_name)

    def exists(self) -> bool:
        fs, path = resolve(self.path)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def latest_checkpoint(self) -> dict | None:
        """Metrics of the checkpoint Ray Train will resume from (they hold the loop's "step"), or None."""
        return ray_train_latest_checkpoint(self.path)

    def move_aside(self) -> str:
        """Renames the run directory to `<run_name>.moved-<timestamp>` beside it; never deletes anything."""
        target = join(self.storage_path, f"{self.run_name}.moved-{time.strftime('%Y%m%d-%H%M%S')}")
        fs, source_path = resolve(self.path)
        _, target_path = resolve(target)
        try:
            fs.move(source_path, target_path)
        except (NotImplementedError, OSError):  # object stores cannot rename a "directory": copy, then remove
            pafs.copy_files(source_path, target_path, source_filesystem=fs, destination_filesystem=fs)
            fs.delete_dir(source_path)
        return target


# --------------------------------------------------------------------------- the workers


def build_trainer(job: PreparedJob, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of this job: N workers with their CPUs (fractions allowed) and GPUs,
    checkpoints under storage_path/run_name (the latest train.keep_checkpoints kept), restarts
    from the latest checkpoint up to cluster.max_failures times. `callbacks`: Ray Train
    UserCallbacks (a sweep passes one that forwards evaluations to Ray Tune)."""
    config = job.config
    cluster = config.cluster
    resources: dict[str, float] = {"CPU": cluster.cpus_per_worker}
    if cluster.use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    resources.update(cluster.worker_resources)  # node roles: e.g. {"trainer": 1}
    # No checkpoint_score_attribute: Ray then keeps checkpoints in the order reported and
    # drops the oldest, so "the latest K" is what stays (score order only applies to a score).
    checkpoints = CheckpointConfig(num_to_keep=config.train.keep_checkpoints)
    # Ray Data reads its progress interval from the environment of the process running the stream
    # (a worker, or the coordinator of a multi-worker split, which inherits the workers' env_vars).
    progress_env = {"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": str(config.data.progress_log_every_s)}
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": config},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=cluster.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cluster.run_name, storage_path=cluster.storage_path,
                             checkpoint_config=checkpoints,
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             callbacks=callbacks, worker_runtime_env={"env_vars": progress_env}),
    )


# --------------------------------------------------------------------------- one job


@dataclass
class TrainOutcome:
    """What a finished job leaves: Ray's Result plus rank 0's summary of the loop."""

    result: Any  # ray.train.Result
    run_path: str
    tracking_uri: str
    resumed_from_step: int | None = None
    moved_aside_to: str | None = None
    # run_training's return on rank 0: "before"/"final" metrics, step, epoch, samples_seen,
    # mlflow_run_id, mlflow_experiment_id.
    summary: dict = field(default_factory=dict)

    @property
    def before(self) -> dict:
        return self.summary.get("before") or {}

    @property
    def final(self) -> dict:
        return self.summary.get("final") or {}

    @property
    def mlflow_run_id(self) -> str | None:
        return self.summary.get("mlflow_run_id")

    @property
    def mlflow_experiment_id(self) -> str | None:
        return self.summary.get("mlflow_experiment_id")

    @property
    def checkpoint_path(self) -> str | None:
        return self.result.checkpoint.path if self.result.checkpoint is not None else None


def train(job: PreparedJob, callbacks: list | None = None) -> TrainOutcome:
    """Runs (or resumes) one prepared job on the connected Ray cluster; raises
    ray.train.TrainingFailedError when it fails."""
    config = job.config
    cluster = config.cluster
    run = RunDirectory(cluster.storage_path, cluster.run_name)
    moved_to = None
    if cluster.fresh_start and run.exists():
        moved_to = run.move_aside()
        log.info("fresh start: moved the previous run %s aside to %s", cluster.run_name, moved_to)
    latest = run.latest_checkpoint()
    resumed_from = int(latest["step"]) if latest and "step" in latest else None
    if resumed_from is not None:
        log.info("resuming run %s from step %d of %d (checkpoint %s)", cluster.run_name, resumed_from,
                 config.train.steps, basename(latest["checkpoint"]))
        if resumed_from >= config.train.steps:
            log.warning("run %s has done its %d steps already: it is only evaluated again (raise "
                        "train.steps to go on, or set cluster.fresh_start=true to start over)",
                        cluster.run_name, resumed_from)
    else:
        log.info("starting fresh run %s in %s", cluster.run_name, run.path)
    log.info("%d worker(s) x %s; MLflow at %s", cluster.num_workers,
             f"{cluster.cpus_per_worker:g} CPU" + (f" + {cluster.gpus_per_worker:g} GPU" if cluster.use_gpu else ""),
             config.tracking.tracking_uri)
    # fit() on the main thread installs a Ctrl-C handler holding its controller and never takes it out.
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        result = build_trainer(job, callbacks).fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint_handler)
    return TrainOutcome(result=result, run_path=run.path, tracking_uri=config.tracking.tracking_uri,
                        resumed_from_step=resumed_from, moved_aside_to=moved_to,
                        summary=result.return_value or {})
