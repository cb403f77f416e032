"""Which MLflow run a training job logs to: the store, the experiment, a resumed or new (child) run, its params.

Apart from clip_ray.tracking.tracker because these are one-time decisions made against
the server, each safe to repeat after a failure halfway, while the tracker's
own concern is buffering and retrying around them.

Default store: `sqlite:///<cwd>/mlflow.db`, artifacts in `<cwd>/mlruns`. It is
MLflow 3's own default since 3.7 (the ./mlruns file store is legacy), it needs
no server and its model registry works; `mlflow ui` started in the same
directory shows it. The URI is made absolute, so resolve it on the driver and
hand it to the workers, whose working directory differs.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException

from clip_ray.config import TrackingConfig
from clip_ray.storage import is_uri

# The tracker's logger: these are the tracker's warnings.
logger = logging.getLogger("clip_ray.tracking.tracker")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's limits (mlflow.utils.validation).
_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """config.tracking_uri, else $MLFLOW_TRACKING_URI, else the local SQLite store; local paths made absolute."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    if not is_uri(uri) and not uri.startswith(("databricks", "file:")):  # a bare path: MLflow's file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


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


def resume_or_create_run(client, config: TrackingConfig, uri: str, run_id: str | None,
                         run_name: str | None) -> Run:
    """Run `run_id` (set RUNNING again) when the store has it, else a new run: a child of
    config.parent_run_id in its parent's experiment when that exists, else in config.experiment."""
    if run_id is not None:
        run = _get_or_none(client.get_run, run_id)
        if run is not None:
            if run.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return run
        logger.warning("MLflow run %s is not in %s; starting a new run", run_id, uri)
    tags = dict(config.tags)
    experiment_id = None
    if config.parent_run_id:
        parent = _get_or_none(client.get_run, config.parent_run_id)
        if parent is None:
            logger.warning("MLflow parent run %s does not exist; this run has no parent", config.parent_run_id)
        else:
            tags["mlflow.parentRunId"] = config.parent_run_id
            experiment_id = parent.info.experiment_id
    experiment_id = experiment_id or _experiment_id(client, config.experiment, uri)
    return client.create_run(experiment_id, run_name=run_name, tags=tags)


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep a local store's artifacts beside its database
        location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another job created it a moment ago
            raise
        return client.get_experiment_by_name(name).experiment_id


def log_new_params(client, run: Run, params: dict[str, str]) -> None:
    """Logs the params `run` does not have yet; MLflow params are immutable, so a changed one keeps
    its first value (and is warned about)."""
    existing = run.data.params
    changed = sorted(key for key, value in params.items() if key in existing and existing[key] != value)
    if changed:
        logger.warning("MLflow run %s: resumed with changed params %s; the run keeps the old values",
                       run.info.run_id, ", ".join(changed))
    new = [Param(key, value) for key, value in params.items() if key not in existing]
    for start in range(0, len(new), _PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=new[start:start + _PARAMS_PER_BATCH])


def _get_or_none(get: Callable[[str], Any], key: str) -> Any:
    """get(key), or None when the server answers that it does not exist; other errors propagate."""
    try:
        return get(key)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


LOCAL_UI = "http://127.0.0.1:5000"


def mlflow_ui_hint(tracking_uri: str) -> str:
    """How a person opens the runs of this tracking URI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def mlflow_run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in its machine-learning view: MLflow 3's UI opens an experiment
    in the GenAI view (trace panels, no charts) unless the link says otherwise. A local store's link
    is on the `mlflow ui` of mlflow_ui_hint."""
    server = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{server}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def source_tags(command: str | None = None) -> dict[str, str]:
    """MLflow's standard source tags of a job started by this process, read on the driver (a Ray
    worker's user and working directory may differ): the script or `clip-ray <command>`, JOB under
    `ray job submit` else LOCAL, the login name, and the git commit of the working directory if it
    is a checkout. Nothing here fails: what cannot be found is left out."""
    argv = sys.argv or [""]
    program = Path(argv[0]).name
    if command is None and program in ("clip-ray", "__main__.py") and len(argv) > 1:
        command = argv[1]
    tags = {"mlflow.source.name": f"clip-ray {command}" if command else str(Path(argv[0]).resolve()),
            "mlflow.source.type": "JOB" if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") else "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        pass
    commit = _git_commit(Path.cwd())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit(directory: Path) -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git installed, or it hangs
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None
