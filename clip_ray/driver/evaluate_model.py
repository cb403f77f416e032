"""Evaluating a trained model outside training: a checkpoint, a run directory, or an MLflow model.

The same `Evaluator` as in the loop measures it (zero-shot on data.zeroshot_dir,
retrieval recall and loss on data.val), so numbers compare with those logged
during training. The model brings its own architecture (a checkpoint's model.pt
and an MLflow model's metadata both record it); the config brings the data, the
tokenizer and the evaluation settings.

Where the model comes from (a checkpoint, the latest under a run directory, an MLflow
model) is clip_ray.inference.models' business, shared with `clip-ray embed` and search.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from clip_ray.config import Config
from clip_ray.eval.evaluate import Evaluator
from clip_ray.inference.mlflow_models import is_mlflow_uri, load_mlflow_model
from clip_ray.inference.models import checkpoint_directory
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.worker.checkpoint import load_model_from_checkpoint


def evaluate_model(config: Config, source: str, device: torch.device | str | None = None) -> dict[str, float]:
    """Metrics of the model at `source` on the config's data (see the module docstring).

    `config` is a prepared one (clip_ray.driver.prepare.prepare_job: absolute paths, a resolved
    tracking URI, a trained tokenizer). The evaluation uses Ray Data for data.val, so a Ray
    session must be up.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="clip-ray-eval-") as scratch:
        if is_mlflow_uri(source):
            model = load_mlflow_model(source, config.tracking.tracking_uri, config.data.tokenizer)
        else:
            model = load_model_from_checkpoint(checkpoint_directory(str(source), Path(scratch)))
        model = model.to(device)
        config = copy.deepcopy(config)
        config.model = model.config  # image size and context length are the model's
        config.train.precision = "fp32" if device.type == "cpu" else config.train.precision
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
        return Evaluator(config, tokenizer, device)(model)
