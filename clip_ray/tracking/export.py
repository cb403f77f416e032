"""A CLIP as an MLflow model: copied off the training model, exported with torch.export, registered.

Kept apart from the tracker's buffering and retrying because none of it is about
reaching the server: it is about what a logged CLIP is. The tracker copies the
model on the training thread (`snapshot_model`, `example_batch`) and calls
`log_clip_model` / `register_clip_model` later from its sending thread.

pt2 (torch.export) rather than pickle: loading runs no pickled code and needs
only torch, not clip_ray; the loaded module is forward-only and returns a plain
tuple (image_features, text_features, logit_scale[, logit_bias]), features
unit-norm. The model's config and output names go into the MLflow metadata, so
clip_ray.driver.evaluate_model can rebuild the rest around it.

Given the tokenizer, the same model folder is also a python_function model
(clip_ray.tracking.pyfunc: images and texts in, embeddings out, the tokenizer
inside the model), which `mlflow models serve` serves and the registry versions.
`save_clip_model` is the flavor save that MLflow's Model.log calls for both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import types
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import Model, ModelSignature
from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils
from mlflow.types import Schema, TensorSpec
from torch import nn

from clip_ray.config import to_dict
from clip_ray.model.clip import build_model, unwrap_model
from clip_ray.model.tokenizer import Tokenizer, load_tokenizer
from clip_ray.tracking.pyfunc import add_pyfunc_flavor

logger = logging.getLogger(__name__)

# Model.log and register_model read the process-wide tracking URI.
_FLUENT_URI_LOCK = threading.Lock()


class _ExportedClip(nn.Module):
    """torch.export cannot serialise our ClipOutput namedtuple, so the logged model returns a tuple."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.clip(images, tokens)
        return tuple(value for value in output if value is not None)


def snapshot_model(model: nn.Module) -> nn.Module:
    """A CPU copy of the CLIP inside any DDP/compile wrapper, so training can go on changing the original."""
    clip = unwrap_model(model)
    weights = {name: value.detach().to("cpu", copy=True) for name, value in clip.state_dict().items()}
    # Built on the meta device and given the copied tensors: no time spent on a random init.
    copy = build_model(dataclasses.replace(clip.config, grad_checkpointing=False), device="meta")
    copy.load_state_dict(weights, assign=True)
    left_on_meta = [name for name, value in [*copy.named_parameters(), *copy.named_buffers()] if value.is_meta]
    if left_on_meta:
        raise RuntimeError(f"not in the state dict, so not copied: {left_on_meta}")
    return copy.eval()


def example_batch(images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of each: torch.export fixes any dimension of size 1, and the batch must stay dynamic."""

    def two_rows(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu()[:2]
        return torch.cat([x, x]) if len(x) == 1 else x.clone()

    return two_rows(images).float(), two_rows(tokens)


def _signature(example: tuple[torch.Tensor, torch.Tensor]) -> ModelSignature:
    """Any batch size; every other dimension and the token dtype as in the example."""
    images, tokens = example
    return ModelSignature(inputs=Schema([
        TensorSpec(np.dtype(np.float32), (-1, *images.shape[1:]), "images"),
        TensorSpec(np.dtype(str(tokens.dtype).removeprefix("torch.")), (-1, *tokens.shape[1:]), "tokens"),
    ]))


def requirements() -> list[str]:
    """What serving the model needs beside MLflow, pinned as installed here: torch for the pt2 flavor, the rest
    for the pyfunc flavor's preprocessing and tokenizer (its clip_ray code travels inside the model).
    Named, because MLflow's requirement inference runs a slow subprocess."""
    from importlib.metadata import version

    return [f"torch=={torch.__version__.split('+')[0]}",
            *(f"{name}=={version(name)}" for name in _PYFUNC_DISTRIBUTIONS)]


# The distributions the pyfunc flavor imports beyond torch and MLflow's own (pandas, pyyaml).
_PYFUNC_DISTRIBUTIONS = ("numpy", "pillow", "tokenizers", "ftfy", "regex", "pyarrow")


def save_clip_model(path: str, mlflow_model, *, clip: nn.Module, example: tuple[torch.Tensor, torch.Tensor],
                    tokenizer: Tokenizer | None, validate_serving_input: bool = False) -> None:
    """The flavor save Model.log calls: the pt2 pytorch flavor, then (given the tokenizer) the pyfunc flavor.
    `validate_serving_input` is Model.log's own option, which it passes on to the flavor too."""
    mlflow.pytorch.save_model(_ExportedClip(clip).eval(), path, mlflow_model=mlflow_model,
                              serialization_format="pt2", input_example=example, signature=_signature(example),
                              pip_requirements=requirements())
    if tokenizer is not None:
        add_pyfunc_flavor(path, mlflow_model, clip.config, tokenizer)


def log_clip_model(client, uri: str, *, experiment_id: str, run_id: str, params: dict[str, str],
                   model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], name: str, step: int,
                   tokenizer: Tokenizer | None = None) -> str:
    """Logs a snapshot to the run at `uri` and returns its model URI; MLflow links the run's metrics at
    `step` to it. With its tokenizer the model is also a pyfunc model (clip_ray.tracking.pyfunc)."""
    images, tokens = example
    outputs = ["image_features", "text_features", "logit_scale"]
    if model.logit_bias is not None:
        outputs.append("logit_bias")
    metadata = {"outputs": outputs, "model_config": to_dict(model.config),
                # The signature is the pyfunc flavor's (when there is one); the pt2 program's forward takes these.
                "pytorch_inputs": {"images": f"float32 [-1, {', '.join(map(str, images.shape[1:]))}]",
                                   "tokens": f"{str(tokens.dtype).removeprefix('torch.')} [-1, {tokens.shape[1]}]"}}
    # Created here because log_model, with no active run, would file it under the Default experiment.
    logged = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, params=params)
    # Model.log is what mlflow.pytorch.log_model calls too; its flavor here is save_clip_model (both flavors).
    flavor = types.SimpleNamespace(save_model=save_clip_model)
    with _FLUENT_URI_LOCK, process_tracking_uri(uri):
        # No serving-input check: it would load a second copy of the model, onto the trainer's GPU where there is
        # one, at the end of every run (tests/test_pyfunc_serving.py checks the flavor).
        info = Model.log(artifact_path=None, name=name, flavor=flavor, model_id=logged.model_id, run_id=run_id,
                         step=step, metadata=metadata, clip=model, example=example, tokenizer=tokenizer,
                         validate_serving_input=False)
    return info.model_uri


def model_tokenizer(path: str | Path | None, context_length: int) -> Tokenizer | None:
    """The tokenizer to bundle with the model, or None (warned: the model is then logged without its
    pyfunc flavor, as a tokenizer that does not load could not serve)."""
    if not path:
        logger.warning("MLflow: no tokenizer given, so the model is logged without its python_function flavor")
        return None
    try:
        return load_tokenizer(path, context_length)
    except Exception as err:  # a malformed file fails in many ways; none may stop the model being logged
        logger.warning("MLflow: tokenizer %s does not load (%s: %s), so the model is logged without its "
                       "python_function flavor", path, type(err).__name__, err)
        return None


def register_clip_model(uri: str, model_uri: str, registered_name: str) -> str:
    """Registers a logged model under `registered_name` without waiting for it to be ready; its version."""
    with _FLUENT_URI_LOCK, process_tracking_uri(uri):
        return mlflow.register_model(model_uri, registered_name, await_registration_for=0).version


@contextlib.contextmanager
def process_tracking_uri(uri: str):
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
