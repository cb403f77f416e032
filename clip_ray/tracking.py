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

Default store: `sqlite:///<cwd>/mlflow.db`, artifacts in `<cwd>/mlruns`. It is
MLflow 3's own default since 3.7 (the ./mlruns file store is legacy), it needs
no server and its model registry works; `mlflow ui` started in the same
directory shows it. The URI is made absolute, so resolve it on the driver and
hand it to the workers, whose working directory differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
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

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils
from mlflow.types import Schema, TensorSpec
from mlflow.utils.validation import _validate_metric_name
from torch import nn

from clip_ray.config import TrackingConfig, to_dict
from clip_ray.model.clip import _unwrap, build_model
from clip_ray.plots import plot_history

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Our retry loop replaces MLflow's, which can block for minutes against a dead server.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# MLflow's limits (mlflow.utils.validation).
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000
# mlflow.pytorch.log_model and register_model read the process-wide tracking URI.
_FLUENT_URI_LOCK = threading.Lock()


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """config.tracking_uri, else $MLFLOW_TRACKING_URI, else the local SQLite store; local paths made absolute."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if "://" not in uri and not uri.startswith(("databricks", "file:")):  # a bare path: MLflow's file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses '@' in metric names: recall@k is logged as R_at_k (val/image_to_text_R_at_5)."""
    return name.replace("@", "_at_")


def flatten_params(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config dict -> {"train.lr": "0.0005", "data.train.0.path": ...}, values cut to MLflow's limit.

    Lists of plain values stay one param ("[3, 4, 6, 3]"); lists of mappings are numbered.
    """
    if isinstance(tree, dict) and tree:
        children = tree.items()
    elif isinstance(tree, list) and any(isinstance(value, (dict, list)) for value in tree):
        children = enumerate(tree)
    else:
        text = json.dumps(tree) if isinstance(tree, (dict, list)) else str(tree)
        return {prefix: text[:_MAX_PARAM_LENGTH]}
    flat: dict[str, str] = {}
    for key, value in children:
        flat.update(flatten_params(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class NullTracker:
    """The tracker of ranks other than 0: the same interface, and nothing happens.

    Tracker subclasses it, so the docstrings here describe the real behaviour.
    """

    run_id: str | None = None
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
        """Snapshots the CLIP now; exports, uploads and (optionally) registers it in the background."""

    def log_figures(self) -> None:
        """Draws loss/metric curves from everything logged so far and uploads them under plots/."""

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Waits until everything queued so far is sent; False if it was not within `timeout_s`."""
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


class _ExportedClip(nn.Module):
    """torch.export cannot serialise our ClipOutput namedtuple; the logged model returns a plain tuple:
    (image_features, text_features, logit_scale[, logit_bias]), features unit-norm."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.clip(images, tokens)
        return tuple(value for value in output if value is not None)


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
        self._experiment_of_run: str | None = None
        self._unreachable = False
        self._last_step = 0
        self._warned: set[str] = set()
        self._staging = Path(tempfile.mkdtemp(prefix="clip-ray-tracking-"))
        self._system_monitors = self._make_system_monitors() if config.log_system_metrics else []
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
            snapshot, example, step = _snapshot(model), _example_batch(*input_example), self._last_step
        except Exception as err:
            logger.warning("MLflow: cannot copy the model for logging (%s); it is not logged", _short(err))
            return
        self._add_job(f"model {name}", lambda client: self._send_model(snapshot, example, name, step))
        if tokenizer_path is not None:
            self.log_artifact(tokenizer_path, "tokenizer")
        if self.config.register_model_as:
            self._add_job(f"registration {self.config.register_model_as}", lambda client: self._register())

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
            if self._system_monitors and now >= next_sample:
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
        run = None
        if self.run_id is not None:
            run = _get_or_none(client.get_run, self.run_id)
            if run is None:
                logger.warning("MLflow run %s is not in %s; starting a new run", self.run_id, self.uri)
            elif run.info.status != "RUNNING":
                client.update_run(self.run_id, status="RUNNING")
        if run is None:
            tags = {}
            experiment_id = None
            if self.config.parent_run_id:
                parent = _get_or_none(client.get_run, self.config.parent_run_id)
                if parent is None:
                    logger.warning("MLflow parent run %s does not exist; this run has no parent",
                                   self.config.parent_run_id)
                else:
                    tags["mlflow.parentRunId"] = self.config.parent_run_id
                    experiment_id = parent.info.experiment_id
            experiment_id = experiment_id or self._experiment_id(client)
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id  # a retry after a failure below resumes this run, never a second one
        self._log_params(client, run.data.params)
        self._experiment_of_run = run.info.experiment_id
        self._run_ready = True

    def _experiment_id(self, client) -> str:
        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # keep a local store's artifacts beside its database
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
        try:
            return client.create_experiment(self.config.experiment, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it a moment ago
                raise
            return client.get_experiment_by_name(self.config.experiment).experiment_id

    def _log_params(self, client, existing: dict[str, str]) -> None:
        changed = sorted(key for key, value in self.params.items() if key in existing and existing[key] != value)
        if changed:  # MLflow params are immutable: the run keeps its first values
            logger.warning("MLflow run %s: resumed with changed params %s; the run keeps the old values",
                           self.run_id, ", ".join(changed))
        new = [Param(key, value) for key, value in self.params.items() if key not in existing]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=new[start:start + _PARAMS_PER_BATCH])

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

    # ------------------------------------------------------------------ model and system metrics

    def _send_model(self, model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], name: str,
                    step: int) -> None:
        """pt2 (torch.export) rather than pickle: loading runs no pickled code and needs only torch, not
        clip_ray; the loaded module is forward-only and returns _ExportedClip's tuple. MLflow links
        the run's metrics at `step` to the logged model."""
        images, tokens = example
        signature = ModelSignature(inputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, *images.shape[1:]), "images"),
            TensorSpec(np.dtype(str(tokens.dtype).removeprefix("torch.")), (-1, *tokens.shape[1:]), "tokens"),
        ]))
        outputs = ["image_features", "text_features", "logit_scale"]
        if model.logit_bias is not None:
            outputs.append("logit_bias")
        # Created here because log_model, with no active run, would file it under the Default experiment.
        logged = self._get_client().create_logged_model(self._experiment_of_run, name=name,
                                                        source_run_id=self.run_id, params=self.params)
        with _FLUENT_URI_LOCK, _process_tracking_uri(self.uri):
            info = mlflow.pytorch.log_model(
                _ExportedClip(model).eval(), name=name, model_id=logged.model_id, run_id=self.run_id,
                serialization_format="pt2",
                input_example=example, signature=signature, step=step,
                # pt2 needs torch alone; naming it skips MLflow's slow requirement inference (a subprocess).
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"outputs": outputs, "model_config": to_dict(model.config)})
        self.model_uri = info.model_uri

    def _register(self) -> None:
        if self.model_uri is None:
            return
        with _FLUENT_URI_LOCK, _process_tracking_uri(self.uri):
            version = mlflow.register_model(self.model_uri, self.config.register_model_as,
                                            await_registration_for=0)
        self.model_version = version.version

    def _make_system_monitors(self) -> list:
        """MLflow's own CPU/memory/disk/network (and NVIDIA GPU) probes, sampled by our thread so their
        values survive an outage like every other metric (MLflow's monitor thread gives up at the first)."""
        try:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor
        except ImportError as err:
            logger.warning("System metrics are off: %s (pip install psutil)", err)
            return []
        monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            monitors.append(GPUMonitor())
        except Exception as err:  # no NVIDIA GPU, or nvidia-ml-py missing
            logger.debug("No GPU system metrics: %s", err)
        return monitors

    def _sample_system_metrics(self) -> None:
        values: dict[str, float] = {}
        try:
            for monitor in self._system_monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        except Exception as err:
            self._warn_once("system", "System metrics failed (%s); they are off", err)
            self._system_monitors = []
            return
        timestamp = int(time.time() * 1000)
        with self._lock:  # at the latest training step, so they share the x-axis of the training curves
            for name, value in values.items():
                self._buffer(Metric(f"system/{name}", float(value), timestamp, self._last_step))


def _snapshot(model: nn.Module) -> nn.Module:
    """A CPU copy of the CLIP inside any DDP/compile wrapper, so training can go on changing the original."""
    clip = _unwrap(model)
    weights = {name: value.detach().to("cpu", copy=True) for name, value in clip.state_dict().items()}
    # Built on the meta device and given the copied tensors: no time spent on a random init.
    copy = build_model(dataclasses.replace(clip.config, grad_checkpointing=False), device="meta")
    copy.load_state_dict(weights, assign=True)
    left_on_meta = [name for name, value in [*copy.named_parameters(), *copy.named_buffers()] if value.is_meta]
    if left_on_meta:
        raise RuntimeError(f"not in the state dict, so not copied: {left_on_meta}")
    return copy.eval()


def _example_batch(images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of each: torch.export fixes any dimension of size 1, and the batch must stay dynamic."""

    def two_rows(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()[:2]
        return torch.cat([x, x]) if len(x) == 1 else x.clone()

    return two_rows(images).float(), two_rows(tokens)


@contextlib.contextmanager
def _process_tracking_uri(uri: str):
    """MLflow's fluent calls read a process-wide URI: set ours for the call, then put both the
    global and $MLFLOW_TRACKING_URI back as they were (set_tracking_uri writes the variable)."""
    global_before = mlflow_tracking_utils._tracking_uri
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(global_before)  # None unsets the variable
        if env_before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


def _get_or_none(get: Callable[[str], Any], key: str) -> Any:
    """get(key), or None when the server answers that it does not exist; other errors propagate."""
    try:
        return get(key)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _short(err: Exception, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
