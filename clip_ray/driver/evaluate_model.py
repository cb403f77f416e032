"""Evaluating a trained model outside training: a checkpoint, a run directory, or an MLflow model.

The same `Evaluator` as in the loop measures it (zero-shot on data.zeroshot_dir,
retrieval recall and loss on data.val), so numbers compare with those logged
during training. The model brings its own architecture (a checkpoint's model.pt
and an MLflow model's metadata both record it); the config brings the data, the
tokenizer and the evaluation settings.

An MLflow model is the torch.export program clip-ray logs: it has nothing but
forward(images, tokens) -> (image_features, text_features, logit_scale[, logit_bias]).
`ForwardOnlyClip` gives it the encode_image / encode_text the evaluator calls by
running forward with a stand-in for the other input. Both towers see only their
own input, row by row, so the stand-in cannot change the features.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch
from ray.train import Checkpoint
from torch import nn

from clip_ray.config import Config, ModelConfig, from_dict
from clip_ray.driver.trainer import RunDirectory
from clip_ray.eval.evaluate import Evaluator
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.storage import is_uri
from clip_ray.tracking.export import process_tracking_uri
from clip_ray.worker.checkpoint import find_latest_checkpoint, is_complete_checkpoint, load_model_from_checkpoint

log = logging.getLogger("clip_ray.eval")

MLFLOW_URI_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")


def is_mlflow_uri(source: str) -> bool:
    return str(source).startswith(MLFLOW_URI_PREFIXES)


class ForwardOnlyClip(nn.Module):
    """The CLIP interface the evaluator needs, around a module that only has CLIP's forward."""

    def __init__(self, forward_only: nn.Module, model_config: ModelConfig, blank_tokens: torch.Tensor):
        super().__init__()
        self.forward_only = forward_only
        self.config = model_config
        self.register_buffer("blank_tokens", blank_tokens)  # one tokenized empty caption, [1, context_length]
        outputs = forward_only(self._blank_images(2), blank_tokens.expand(2, -1))
        # The evaluator reads the temperature as CLIP stores it: a log that it exponentiates.
        self.register_buffer("logit_scale", outputs[2].detach().float().log())
        self.register_buffer("logit_bias", outputs[3].detach() if len(outputs) > 3 else None)

    def _blank_images(self, n: int) -> torch.Tensor:
        size = self.config.vision.image_size
        return torch.zeros(n, 3, size, size, device=self.blank_tokens.device)

    def train(self, mode: bool = True) -> "ForwardOnlyClip":
        # An exported program refuses train()/eval(); it is in inference form already.
        self.training = mode
        return self

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_only(images, self.blank_tokens.expand(len(images), -1))[0]

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.forward_only(self._blank_images(len(tokens)), tokens)[1]


def _checkpoint_directory(source: str, scratch: Path) -> Path:
    """A local checkpoint directory for `source`: itself, the latest one under a run directory,
    or a download of a remote one (s3://, gs://: a checkpoint, or a run and then its latest)."""
    if is_uri(source):
        latest = RunDirectory(*source.rstrip("/").rsplit("/", 1)).latest_checkpoint()
        if latest is not None:
            source = latest["checkpoint"]
        return Path(Checkpoint(source).to_directory(str(scratch / "checkpoint")))
    path = Path(source)
    if is_complete_checkpoint(path):
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{source}: neither a checkpoint nor a folder holding one")
    log.info("evaluating the latest checkpoint under %s: %s", source, latest)
    return latest


def load_mlflow_model(uri: str, tracking_uri: str, tokenizer_path: str) -> ForwardOnlyClip:
    """An MLflow model logged by clip-ray, with the architecture its metadata records."""
    with process_tracking_uri(tracking_uri):
        metadata = mlflow.models.get_model_info(uri).metadata or {}
        if "model_config" not in metadata:
            raise FileNotFoundError(f"{uri}: not a clip-ray model (its metadata has no model_config)")
        forward_only = mlflow.pytorch.load_model(uri)
    model_config = from_dict(ModelConfig, metadata["model_config"])
    blank = load_tokenizer(tokenizer_path, model_config.text.context_length)([""])
    return ForwardOnlyClip(forward_only, model_config, blank)


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
            model = load_model_from_checkpoint(_checkpoint_directory(str(source), Path(scratch)))
        model = model.to(device)
        config = copy.deepcopy(config)
        config.model = model.config  # image size and context length are the model's
        config.train.precision = "fp32" if device.type == "cpu" else config.train.precision
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
        return Evaluator(config, tokenizer, device)(model)
