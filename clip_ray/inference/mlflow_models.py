"""MLflow models clip-ray logged: finding one, its config and tokenizer, and its weights without unpickling.

An MLflow model is the torch.export program clip-ray logs: it has nothing but
forward(images, tokens) -> (image_features, text_features, logit_scale[, logit_bias]).
`ForwardOnlyClip` gives it encode_image / encode_text by running forward with a stand-in for
the other input. Both towers see only their own input, row by row, so the stand-in cannot
change the features. A pickled MLflow model (mlflow.pytorch's default format, a cloudpickled
pyfunc) is refused: loading it would run whatever code its pickle names.
"""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from clip_ray.config import ModelConfig, from_dict
from clip_ray.inference.sources import ModelSourceError, tokenizer_file
from clip_ray.model.tokenizer import Tokenizer, load_tokenizer
from clip_ray.storage import basename

log = logging.getLogger("clip_ray.inference")

MLFLOW_URI_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")
# `runs:/ID` with nothing after it: the run, whose model clip-ray logs as "model".
_BARE_RUN = re.compile(r"^runs:/([^/]+)/?$")
# The name the training loop logs its final model under (clip_ray.tracking.tracker).
MLFLOW_MODEL_NAME = "model"
MLFLOW_TOKENIZER_ARTIFACT = "tokenizer"


def is_mlflow_uri(source: str) -> bool:
    return str(source).startswith(MLFLOW_URI_PREFIXES)


class ForwardOnlyClip(nn.Module):
    """The CLIP interface the evaluator and the encoder need, around a module that only has CLIP's forward."""

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


def _mlflow_model_config(metadata: dict | None, uri: str) -> ModelConfig:
    if not metadata or "model_config" not in metadata:
        raise ModelSourceError(f"{uri}: not a clip-ray model (its metadata has no model_config)")
    return from_dict(ModelConfig, metadata["model_config"])


# What a pickled MLflow model leaves in its folder (mlflow.pytorch's default format, a pyfunc PythonModel).
_PICKLED_MODEL_FILES = ("model.pth", "pickle_module_info.txt", "python_model.pkl")
EXPORTED_PROGRAM_FILE = "data/model.pt2"


def exported_program_file(model_dir: Path, uri: str) -> Path:
    """The torch.export program in a downloaded clip-ray MLflow model; a pickled model is refused, since
    loading it would run whatever code its pickle names."""
    program = model_dir / EXPORTED_PROGRAM_FILE
    if program.is_file():
        return program
    pickled = sorted(str(p.relative_to(model_dir)) for name in _PICKLED_MODEL_FILES for p in model_dir.rglob(name))
    if pickled:
        raise ModelSourceError(f"{uri}: a pickled MLflow model ({', '.join(pickled)}); clip-ray loads MLflow models "
                               "only as a torch.export program (data/model.pt2) or as weights, because unpickling "
                               "runs code. Log it with serialization_format='pt2', or give its state dict / "
                               ".safetensors file instead")
    raise ModelSourceError(f"{uri}: no {EXPORTED_PROGRAM_FILE} in this MLflow model: not one clip-ray logged")


def load_exported_program(uri: str, tracking_uri: str) -> torch.export.ExportedProgram:
    """The program of an MLflow model clip-ray logged, read with torch.export.load (no pickled code)."""
    import mlflow.artifacts

    from clip_ray.tracking.export import process_tracking_uri
    from clip_ray.tracking.pyfunc import load_pickle_free_program

    with tempfile.TemporaryDirectory(prefix="clip-ray-mlflow-model-") as scratch:
        with process_tracking_uri(tracking_uri):  # models:/ URIs are resolved against the process-wide URI
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch)
        return load_pickle_free_program(exported_program_file(Path(local), uri))


def exported_program_state_dict(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """The CLIP's weights in OpenAI's layout, out of the program logged around it (tracking/export.py)."""
    prefix = "clip."
    return {name.removeprefix(prefix): tensor.detach().float().clone() if tensor.is_floating_point() else tensor
            for name, tensor in program.state_dict.items()}


def load_mlflow_model(uri: str, tracking_uri: str, tokenizer: str | Tokenizer) -> ForwardOnlyClip:
    """An MLflow model logged by clip-ray, with the architecture its metadata records; `tokenizer`
    (a path or a loaded tokenizer) makes the blank caption the image tower is run beside."""
    import mlflow.models

    from clip_ray.tracking.export import process_tracking_uri

    with process_tracking_uri(tracking_uri):
        model_config = _mlflow_model_config(mlflow.models.get_model_info(uri).metadata, uri)
    forward_only = load_exported_program(uri, tracking_uri).module()
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer, model_config.text.context_length)
    blank = tokenizer([""], context_length=model_config.text.context_length)
    return ForwardOnlyClip(forward_only, model_config, blank)


def _bundled_tokenizer(info, scratch: Path) -> tuple[str | None, str | None]:
    """(the downloaded tokenizer file inside a logged model, its artifact URI), or Nones for a model logged
    without one; its metadata names the file (tracking/pyfunc.py)."""
    import mlflow.artifacts

    inside = (info.metadata or {}).get("tokenizer")
    if not inside:
        return None, None
    # Not models:/ID/PATH, which MLflow 3.17 reads as a registered model's name: the model's own artifact folder.
    where = f"{info.artifact_path.rstrip('/')}/{inside}"
    return mlflow.artifacts.download_artifacts(artifact_uri=where, dst_path=str(scratch / "bundled")), where


def mlflow_facts(source: str, tracking_uri: str, scratch: Path) -> tuple[str, ModelConfig, str | None, dict]:
    """(the exact model URI, its config, its tokenizer (inside the model, else its run's artifact) or None,
    version) of an MLflow source; the tokenizer is downloaded into `scratch`."""
    import mlflow.artifacts
    import mlflow.models

    from clip_ray.tracking.export import process_tracking_uri

    bare = _BARE_RUN.match(source)
    uri = f"runs:/{bare.group(1)}/{MLFLOW_MODEL_NAME}" if bare else source
    with process_tracking_uri(tracking_uri):
        try:
            info = mlflow.models.get_model_info(uri)
        except Exception as err:  # MLflow raises several types for a missing run or model
            raise ModelSourceError(f"{source}: no MLflow model at {uri} in {tracking_uri} "
                                   f"({type(err).__name__}: {err})") from None
        model_config = _mlflow_model_config(info.metadata, uri)
        model_id = getattr(info, "model_id", None)
        exact = f"models:/{model_id}" if model_id else uri
        tokenizer, where = _bundled_tokenizer(info, scratch)
        if tokenizer is None and info.run_id:  # models logged before the tokenizer went inside them
            try:
                tokenizer = mlflow.artifacts.download_artifacts(
                    run_id=info.run_id, artifact_path=MLFLOW_TOKENIZER_ARTIFACT, dst_path=str(scratch),
                    tracking_uri=tracking_uri)
                where = f"runs:/{info.run_id}/{MLFLOW_TOKENIZER_ARTIFACT}/{basename(tokenizer_file(tokenizer))}"
            except Exception as err:  # no such artifact: the caller must name the tokenizer
                log.info("%s: its run %s has no %s artifact (%s)", source, info.run_id, MLFLOW_TOKENIZER_ARTIFACT, err)
    return exact, model_config, tokenizer, {"model_id": model_id, "run_id": info.run_id, "tokenizer_uri": where}


