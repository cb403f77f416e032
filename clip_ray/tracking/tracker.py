"""MLflow tracking from rank 0 that never stops training.

One training job is one MLflow run: the flattened config as params, every
metric at its step, system metrics, the config YAML, the tokenizer, curves as
PNG, and the final model (optionally registered). A sweep's jobs are child runs
of the sweep's parent run; a resumed job continues its own run.

The training step never waits on MLflow. Calls only append to in-memory queues;
a background thread sends them every `flush_interval_s`. When the server is
away the thread warns once (with the URI and the error), keeps buffering
(metrics are bounded; the oldest are dropped past the bound), tries again every
`TrackingConfig.retry_interval_s`, and when the server answers it creates the
run if it never could and sends everything with its original steps and
timestamps. A failure that is not the server's absence (a bad name, a model
that cannot be exported) is warned about and dropped, never retried forever.

MLflow's HTTP client retries for minutes by default. Unless the user set them,
the tracker sets MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 and
MLFLOW_HTTP_REQUEST_TIMEOUT=5 in its process, so one attempt against a server
that is gone costs seconds; our own retry loop replaces MLflow's.

Beside it: clip_ray.tracking.run finds or creates the run, clip_ray.tracking.export
makes the logged model, clip_ray.tracking.system_metrics reads the host's probes.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_metric_name
from torch import nn

from clip_ray.config import TrackingConfig
from clip_ray.tracking.export import (
    example_batch, log_clip_model, model_tokenizer, register_clip_model, snapshot_model,
)
from clip_ray.tracking.figures import plot_history
from clip_ray.tracking.run import flatten_params, log_new_params, resolve_tracking_uri, resume_or_create_run
from clip_ray.tracking.system_metrics import SystemProbes

logger = logging.getLogger(__name__)

# Our retry loop replaces MLflow's, which can block for minutes against a dead server.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_METRICS_PER_BATCH = 1000  # MLflow's limit (mlflow.utils.validation)


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses '@' in metric names: recall@k is logged as R_at_k (val/image_to_text_R_at_5)."""
    return name.replace("@", "_at_")


class NullTracker:
    """The tracker of ranks other than 0: the same interface, and nothing happens.

    Tracker subclasses it, so the docstrings here describe the real behaviour.
    """

    run_id: str | None = None
    experiment_id: str | None = None
    model_uri: str | None = None
    model_version: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queues metrics at `step` with the current time; returns at once.

        Pass Python numbers: a GPU tensor would make float() wait for the device.
        """

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copies a file or directory aside now and uploads it later (under `artifact_path`)."""

    def log_model(self, model: nn.Module, input_example: tuple[torch.Tensor, torch.Tensor],
                  tokenizer_path: str | Path | None = None, name: str = "model") -> None:
        """Snapshots the CLIP now; exports, uploads and (optionally) registers it in the background. With the
        tokenizer it trained with, the model is also a python_function model that serves (tracking/pyfunc.py)."""

    def log_figures(self) -> None:
        """Draws loss/metric curves from everything logged so far and uploads them under plots/."""

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until everything queued so far is sent; False if it was not within `timeout_s`."""
        return True

    def flush_metrics(self, timeout_s: float = 10.0) -> bool:
        """Waits until the metrics logged so far are in MLflow (artifacts may still be on their way);
        False if they were not within `timeout_s`, and at once while the server is away: the
        metrics stay queued, and training does not wait for a server that is not there."""
        return True

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Sends what is left and ends the run with `status` (FINISHED, FAILED, KILLED).

        `timeout_s` bounds how long an unreachable server is waited for; work in
        progress against a reachable one (a large model upload) is let finish.
        """

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close("FINISHED" if exc_type is None else "FAILED")


def tracker_for_rank(rank: int, config: TrackingConfig, run_config: dict,
                     resume_run_id: str | None = None, **kwargs: Any) -> NullTracker:
    """A real Tracker on rank 0, a NullTracker elsewhere."""
    return Tracker(config, run_config, resume_run_id, **kwargs) if rank == 0 else NullTracker()


class Tracker(NullTracker):
    """One MLflow run for one training job, fed from rank 0; see the module docstring.

    `run_config` is `to_dict(config)`: it becomes the params and config.yaml.
    `resume_run_id` continues that run (the trainer keeps it in its checkpoint);
    `run_id` holds it at once, or the new run's id once the server has answered.
    End it with close() (or use it as a context manager), or the last metrics are lost.
    """

    def __init__(self, config: TrackingConfig, run_config: dict, resume_run_id: str | None = None, *,
                 flush_interval_s: float = 5.0, system_metrics_interval_s: float = 10.0,
                 max_buffered_metrics: int = 200_000):
        for name, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.config = config
        self.uri = resolve_tracking_uri(config)
        self.run_id = resume_run_id
        self.run_name = config.run_name or (run_config.get("cluster") or {}).get("run_name")
        self.params = flatten_params(run_config)
        self.history: dict[str, list[tuple[int, float]]] = {}  # what log_figures draws
        self.dropped_metrics = 0
        self._flush_interval_s = flush_interval_s
        self._max_buffered = max_buffered_metrics
        self._metrics: deque = deque()  # mlflow Metric entities not yet sent
        self._jobs: deque[tuple[str, Callable[[Any], None]]] = deque()  # (what, fn(client)) in order
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._close_deadline = float("inf")
        self._end_status = "FINISHED"
        self._client = None
        self._run_ready = False
        self._unreachable = False
        self._last_step = 0
        self._warned: set[str] = set()
        self._staging = Path(tempfile.mkdtemp(prefix="clip-ray-tracking-"))
        self._system_probes = SystemProbes(config.log_system_metrics)
        self._system_interval_s = system_metrics_interval_s

        config_file = self._staging / "config.yaml"
        config_file.write_text(yaml.safe_dump(run_config, sort_keys=False))
        self._add_job("config.yaml", lambda client: client.log_artifact(self.run_id, str(config_file)))
        self._thread = threading.Thread(target=self._send_loop, name="clip-ray-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called by the training loop

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        with self._lock:
            self._last_step = step
            for name, value in metrics.items():
                name = mlflow_metric_name(name)
                try:  # checked here, so one bad metric cannot get a whole batch refused later
                    _validate_metric_name(name)
                    value = float(value)
                except (MlflowException, TypeError, ValueError) as err:
                    self._warn_once(f"metric:{name}", "metric %r=%r is not logged: %s", name, value, _short(err))
                    continue
                self.history.setdefault(name, []).append((step, value))
                self._buffer(Metric(name, value, timestamp, step))
        if len(self._metrics) >= _METRICS_PER_BATCH:
            self._wake.set()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        try:
            staged = self._stage(path)
        except OSError as err:
            logger.warning("MLflow: cannot read artifact %s (%s); not logged", path, err)
            return
        if staged.is_dir():
            target = "/".join(filter(None, [artifact_path, path.name]))
            self._add_job(str(path), lambda client: client.log_artifacts(self.run_id, str(staged), target))
        else:
            self._add_job(str(path), lambda client: client.log_artifact(self.run_id, str(staged), artifact_path))

    def log_model(self, model: nn.Module, input_example: tuple[torch.Tensor, torch.Tensor],
                  tokenizer_path: str | Path | None = None, name: str = "model") -> None:
        try:
            snapshot, example, step = snapshot_model(model), example_batch(*input_example), self._last_step
        except Exception as err:
            logger.warning("MLflow: cannot copy the model for logging (%s); it is not logged", _short(err))
            return

        tokenizer = model_tokenizer(tokenizer_path, snapshot.config.text.context_length)

        def send(client) -> None:
            self.model_uri = log_clip_model(client, self.uri, experiment_id=self.experiment_id,
                                            run_id=self.run_id, params=self.params, model=snapshot,
                                            example=example, name=name, step=step, tokenizer=tokenizer)

        def register(client) -> None:
            if self.model_uri is not None:  # else logging the model failed, and said so
                self.model_version = register_clip_model(self.uri, self.model_uri, self.config.register_as)

        self._add_job(f"model {name}", send)
        if tokenizer_path is not None:
            self.log_artifact(tokenizer_path, "tokenizer")
        if self.config.register_as:
            self._add_job(f"registration {self.config.register_as}", register)

    def log_figures(self) -> None:
        with self._lock:
            history = {name: list(points) for name, points in self.history.items()}

        def draw_and_send(client) -> None:
            out_dir = self._staging / "plots"
            shutil.rmtree(out_dir, ignore_errors=True)
            if plot_history(history, out_dir):
                client.log_artifacts(self.run_id, str(out_dir), "plots")

        self._add_job("plots", draw_and_send)

    def flush(self, timeout_s: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while not self._idle():
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.05)
        return True

    def flush_metrics(self, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        self._wake.set()
        while True:
            with self._lock:
                if self._run_ready and not self._metrics:
                    return True
            if self._unreachable or time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)

    def close(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        if self._closing.is_set():
            return
        self._end_status = status
        self._close_deadline = time.monotonic() + timeout_s
        self._closing.set()
        self._wake.set()
        self._thread.join()
        with self._lock:
            left = len(self._metrics), [what for what, _ in self._jobs]
        if left[0] or left[1] or not self._run_ready:
            logger.warning("MLflow at %s did not answer within %.0f s of close; not logged: %d metrics, %s (run %s)",
                           self.uri, timeout_s, left[0], ", ".join(left[1]) or "no artifacts", self.run_id)
        shutil.rmtree(self._staging, ignore_errors=True)

    # ------------------------------------------------------------------ queueing

    def _buffer(self, metric) -> None:
        """Appends under self._lock; past the bound the oldest metric goes (counted, warned once)."""
        if len(self._metrics) >= self._max_buffered:
            self._metrics.popleft()
            self.dropped_metrics += 1
            self._warn_once("overflow", "MLflow buffer full (%d metrics): dropping the oldest", self._max_buffered)
        self._metrics.append(metric)

    def _sample_system_metrics(self) -> None:
        values = self._system_probes.read()
        timestamp = int(time.time() * 1000)
        with self._lock:  # at the latest training step, so they share the x-axis of the training curves
            for name, value in values.items():
                self._buffer(Metric(f"system/{name}", float(value), timestamp, self._last_step))

    def _add_job(self, what: str, fn: Callable[[Any], None]) -> None:
        with self._lock:
            self._jobs.append((what, fn))
        self._wake.set()

    def _stage(self, path: Path) -> Path:
        """A private copy, so the caller may delete or rewrite the file before it is uploaded."""
        staged = Path(tempfile.mkdtemp(dir=self._staging)) / path.name
        if path.is_dir():
            shutil.copytree(path, staged)
        else:
            shutil.copy2(path, staged)
        return staged

    def _idle(self) -> bool:
        with self._lock:
            return self._run_ready and not self._metrics and not self._jobs

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    # ------------------------------------------------------------------ the sending thread

    def _send_loop(self) -> None:
        """Sends every flush interval (at once when woken), retries a failed send after the retry
        interval, samples system metrics, and on close sends the rest and ends the run."""
        next_send = next_sample = time.monotonic()
        failed_at = None
        while True:
            now = time.monotonic()
            if self._system_probes and now >= next_sample:
                self._sample_system_metrics()
                next_sample = now + self._system_interval_s
            closing = self._closing.is_set()
            urgent = self._wake.is_set()
            self._wake.clear()
            # While closing, a server that is back should not wait out a long retry interval.
            retry_s = min(self.config.retry_interval_s, 2.0) if closing else self.config.retry_interval_s
            if (failed_at is None or now >= failed_at + retry_s) and (closing or urgent or now >= next_send):
                sent = self._send_everything()
                next_send = now + self._flush_interval_s
                failed_at = None if sent else now
                if closing and sent:
                    self._end_run()
                    return
            if closing and time.monotonic() >= self._close_deadline:
                return
            self._wake.wait(min(0.5, self._flush_interval_s, max(0.0, self._close_deadline - time.monotonic())))

    def _send_everything(self) -> bool:
        try:
            self._ensure_run()
            self._send_metrics()
            self._run_jobs()
        except Exception as err:  # the server is away (or broken): keep everything, try later
            if not self._unreachable:
                logger.warning("MLflow at %s is not reachable (%s); metrics are kept in memory and sent when "
                               "it answers (next try in %.0f s)", self.uri, _short(err),
                               self.config.retry_interval_s)
            self._unreachable = True
            return False
        if self._unreachable:
            logger.warning("MLflow at %s answers again; buffered metrics were sent to run %s", self.uri, self.run_id)
            self._unreachable = False
        return True

    def _get_client(self) -> MlflowClient:
        if self._client is None:  # for a new SQLite store this creates its tables (seconds)
            self._client = MlflowClient(self.uri)
        return self._client

    def _ensure_run(self) -> None:
        """Resumes or creates the run and logs its params; safe to repeat after a failure halfway."""
        if self._run_ready:
            return
        client = self._get_client()
        run = resume_or_create_run(client, self.config, self.uri, self.run_id, self.run_name)
        self.run_id = run.info.run_id  # a retry after a failure below resumes this run, never a second one
        log_new_params(client, run, self.params)
        self.experiment_id = run.info.experiment_id
        self._run_ready = True

    def _send_metrics(self) -> None:
        client = self._get_client()
        while True:
            with self._lock:
                batch = [self._metrics[i] for i in range(min(_METRICS_PER_BATCH, len(self._metrics)))]
                dropped_before = self.dropped_metrics
            if not batch:
                return
            self._call_or_drop(f"{len(batch)} metrics", lambda: client.log_batch(self.run_id, metrics=batch))
            with self._lock:  # overflow drops come off the same end, so they may already be gone
                for _ in range(max(0, len(batch) - (self.dropped_metrics - dropped_before))):
                    self._metrics.popleft()

    def _run_jobs(self) -> None:
        client = self._get_client()
        while True:
            with self._lock:
                if not self._jobs:
                    return
                what, fn = self._jobs[0]
            self._call_or_drop(what, lambda: fn(client))
            with self._lock:
                self._jobs.popleft()

    def _call_or_drop(self, what: str, call: Callable[[], Any]) -> None:
        """Runs `call`; if it fails while the server answers, the fault is in the request: warn, drop it."""
        try:
            call()
        except Exception as err:
            try:
                self._get_client().get_run(self.run_id)
            except Exception:
                raise err from None  # the server is away: keep it for the next try
            logger.warning("MLflow could not log %s to run %s (%s); dropped, not retried", what, self.run_id,
                           _short(err))

    def _end_run(self) -> None:
        try:
            self._get_client().set_terminated(self.run_id, status=self._end_status)
        except Exception as err:
            logger.warning("MLflow at %s: could not end run %s (%s)", self.uri, self.run_id, _short(err))

def _short(err: Exception, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
