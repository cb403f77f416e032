"""One MLflow run per evaluation of a model: its metrics, the suite as params, tags naming the model.

Every evaluation of a suite lands in one experiment ("clip-ray-eval" unless told otherwise),
each metric as `<task>/<metric>` at step 0 (R@k as R_at_k: MLflow refuses '@', as in training),
so the runs of two checkpoints line up column by column in the MLflow UI's run comparison.
Unlike a training run's tracker there is nothing to buffer: the run is written in one go at the
end, and a store that does not answer is an error the caller reports (the results files are
written before).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping, Sequence

from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from clip_ray.config import TrackingConfig
from clip_ray.tracking.run import log_new_params, resume_or_create_run, source_tags
from clip_ray.tracking.tracker import mlflow_metric_name

# MLflow takes at most this many metrics (and tags) in one log_batch call.
_BATCH = 1000


def log_evaluation(uri: str, experiment: str, run_name: str, *, metrics: dict[str, float], params: dict[str, str],
                   tags: dict[str, str], artifacts: str | Path | Sequence[tuple[str, str | Path]] | None = None,
                   series: Mapping[int, Mapping[str, float]] | None = None) -> str:
    """Creates a finished run in `experiment` of the store at `uri` holding all of it; returns its id.
    `artifacts`: a folder whose files are logged as the run's artifacts, or (artifact folder, "" for the
    top; a local file or folder) pairs. `series`: more metrics at other steps, {step: {name: value}} (a WiSE-FT
    run logs each mixing ratio as a step, so the MLflow UI draws every metric as a curve over the ratio)."""
    client = MlflowClient(uri)
    # MLflow's source tags: evaluation runs on the driver, so this process's are the submitter's.
    run = resume_or_create_run(client, TrackingConfig(experiment=experiment, tags=source_tags()), uri, None, run_name)
    run_id = run.info.run_id
    try:
        timestamp = int(time.time() * 1000)
        steps = {0: metrics} if not series else {**series, 0: {**series.get(0, {}), **metrics}}
        values = [Metric(mlflow_metric_name(name), float(value), timestamp, step)
                  for step, at_step in sorted(steps.items()) for name, value in sorted(at_step.items())]
        labels = [RunTag(name, str(value)) for name, value in sorted(tags.items()) if value is not None]
        for start in range(0, max(len(values), len(labels)), _BATCH):
            client.log_batch(run_id, metrics=values[start:start + _BATCH], tags=labels[start:start + _BATCH])
        log_new_params(client, run, params)
        for folder, local in _artifact_sources(artifacts):
            if Path(local).is_dir():
                client.log_artifacts(run_id, str(local), folder or None)
            else:
                client.log_artifact(run_id, str(local), folder or None)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


def _artifact_sources(artifacts: str | Path | Sequence[tuple[str, str | Path]] | None) -> list[tuple[str, str | Path]]:
    if artifacts is None:
        return []
    if isinstance(artifacts, (str, Path)):
        return [("", artifacts)]
    return list(artifacts)
