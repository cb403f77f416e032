"""Where a model comes from: resolved once on the driver, loaded once by each process that encodes.

A source is any of

- a checkpoint directory (manifest.json + model.pt, clip_ray.worker.checkpoint), local or a URI;
- a run directory: its latest complete checkpoint (locally the highest step anywhere under it;
  under a URI the one Ray Train's snapshot names);
- a folder `clip-ray export --to safetensors` wrote (model.safetensors, model_config.json, tokenizer);
- a model.pt file, or a plain OpenAI-layout state dict, whose shapes are read from the weights
  (the activation, which the weights do not say, is given);
- an MLflow model that clip-ray logged (runs:/ID/model, models:/NAME/VERSION, models:/ID,
  mlflow-artifacts:/...), or an MLflow run, `runs:/ID`, meaning its model "model".

`resolve_model` reads what is cheap (the model's config, the step, the tokenizer) and pins the
exact checkpoint or model, so a run that goes on training cannot change the model half-way
through a job. The `ResolvedModel` it returns pickles (Ray ships it to every encoder actor);
`load` builds the module there. `identity` is what an output file records about the model.

The tokenizer must be the one the model was trained with: `--tokenizer` names it, else a
checkpoint's run config names it (data.tokenizer), else an MLflow model's run holds it as the
`tokenizer` artifact.

An MLflow model is the torch.export program clip-ray logs: it has nothing but
forward(images, tokens) -> (image_features, text_features, logit_scale[, logit_bias]).
`ForwardOnlyClip` gives it encode_image / encode_text by running forward with a stand-in for
the other input. Both towers see only their own input, row by row, so the stand-in cannot
change the features.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from clip_ray.config import ModelConfig, TrackingConfig, from_dict
from clip_ray.inference.safetensors_export import load_safetensors_export, safetensors_export_files
from clip_ray.model import model_config_from_state_dict
from clip_ray.model.tokenizer import Tokenizer, load_tokenizer
from clip_ray.storage import basename, is_uri, join, local_absolute, resolve

# MLflow, Ray Train and the checkpoint module (torch.distributed's) are imported where they are used: together
# they take seconds to import, and an encoder actor or a search needs one of them at most.

log = logging.getLogger("clip_ray.inference")

MLFLOW_URI_PREFIXES = ("runs:/", "models:/", "mlflow-artifacts:/")
# `runs:/ID` with nothing after it: the run, whose model clip-ray logs as "model".
_BARE_RUN = re.compile(r"^runs:/([^/]+)/?$")
# Ray Train V2 writes this file into the run directory after every checkpoint.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# The name the training loop logs its final model under (clip_ray.tracking.tracker).
MLFLOW_MODEL_NAME = "model"
MLFLOW_TOKENIZER_ARTIFACT = "tokenizer"


def is_mlflow_uri(source: str) -> bool:
    return str(source).startswith(MLFLOW_URI_PREFIXES)


class ModelSourceError(FileNotFoundError):
    """A model source that cannot be used; the message names it and says what to give instead."""


# --------------------------------------------------------------------------- checkpoints


def ray_train_latest_checkpoint(run_path: str) -> dict | None:
    """The checkpoint Ray Train resumes the run at `run_path` from: {"checkpoint": its path, **its
    metrics} (the metrics hold the loop's "step"), or None when the run has none yet."""
    fs, path = resolve(join(run_path, RAY_SNAPSHOT_FILE))
    try:
        with fs.open_input_stream(path) as stream:
            snapshot = json.loads(stream.read().decode())
    except FileNotFoundError:
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    return {"checkpoint": join(run_path, latest["checkpoint_dir_name"]), **latest.get("metrics", {})}


def latest_checkpoint_location(source: str) -> str:
    """`source` itself when it is a checkpoint, else the latest checkpoint of the run directory it is.

    Local: a complete checkpoint, or the highest step anywhere under the folder. A URI: the
    checkpoint Ray Train's snapshot names, else the URI as it is (taken for a checkpoint).
    """
    from clip_ray.worker.checkpoint import find_latest_checkpoint, is_complete_checkpoint

    if is_uri(source):
        latest = ray_train_latest_checkpoint(source.rstrip("/"))
        return latest["checkpoint"] if latest is not None else source
    path = Path(source)
    if is_complete_checkpoint(path):
        return str(path)
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise ModelSourceError(f"{source}: neither a checkpoint nor a folder holding one")
    log.info("using the latest checkpoint under %s: %s", source, latest)
    return str(latest)


def checkpoint_directory(source: str, scratch: Path) -> Path:
    """A local checkpoint directory for `source`: itself, the latest one under a run directory,
    or a download into `scratch` of a remote one (s3://, gs://: a checkpoint, or a run and then its latest)."""
    location = latest_checkpoint_location(str(source))
    if is_uri(location):
        from ray.train import Checkpoint

        return Path(Checkpoint(location).to_directory(str(scratch / "checkpoint")))
    return Path(location)


# --------------------------------------------------------------------------- MLflow models


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


# --------------------------------------------------------------------------- resolving a source


def file_sha256(path: str) -> str:
    """The hex SHA-256 of a file, local or at a URI."""
    fs, inner = resolve(path)
    digest = hashlib.sha256()
    with fs.open_input_stream(inner) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def config_sha256(model_config: ModelConfig) -> str:
    """A digest of the architecture: two models with the same one compute in the same way."""
    return hashlib.sha256(json.dumps(model_config.architecture(), sort_keys=True).encode()).hexdigest()


@dataclass
class ResolvedModel:
    """One model, pinned: what it is, where exactly its weights are, and its tokenizer. Picklable."""

    source: str  # as given (local paths made absolute)
    kind: str  # "checkpoint" | "file" | "mlflow" | "safetensors" (an exported folder)
    location: str  # the exact checkpoint directory, weights file or MLflow model URI
    model_config: ModelConfig
    tokenizer: Tokenizer
    tokenizer_path: str
    tokenizer_sha256: str
    tokenizer_given: str | None = None  # the tokenizer named by the caller, None when the source's own
    tracking_uri: str | None = None
    version: dict = field(default_factory=dict)  # the weights' SHA-256 (and step), or the MLflow model id
    state_dict_options: dict = field(default_factory=dict)  # for plain state dicts: activation
    training_run_id: str | None = None  # the MLflow run that trained it, where its checkpoint or model says so

    def load(self, device: torch.device | str = "cpu") -> nn.Module:
        """The model in eval mode on `device`, with encode_image / encode_text giving unit-norm features."""
        from clip_ray.worker.checkpoint import load_model_from_checkpoint

        if self.kind == "mlflow":
            model = load_mlflow_model(self.location, self.tracking_uri, self.tokenizer)
        elif self.kind == "safetensors":
            model = load_safetensors_export(self.location)
        else:
            with tempfile.TemporaryDirectory(prefix="clip-ray-model-") as scratch:
                if self.kind == "checkpoint":
                    model = load_model_from_checkpoint(checkpoint_directory(self.location, Path(scratch)))
                else:
                    model = load_model_from_checkpoint(local_copy(self.location, Path(scratch)),
                                                       **self.state_dict_options)
        return model.to(device).eval()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in OpenAI's layout (float32, CPU), for exporting, mixing or initialising a run; an
        MLflow model's come out of its exported program."""
        if self.kind == "mlflow":
            return exported_program_state_dict(load_exported_program(self.location, self.tracking_uri))
        return {name: tensor.detach().clone() for name, tensor in self.load().state_dict().items()}

    def identity(self) -> dict[str, Any]:
        """What an embedding file records about the model (JSON values)."""
        return {
            "source": self.source, "kind": self.kind, "location": self.location, "version": self.version,
            "name": self.model_config.name, "config_sha256": config_sha256(self.model_config),
            "embed_dim": self.model_config.embed_dim, "image_size": self.model_config.vision.image_size,
            "context_length": self.model_config.text.context_length,
            "tokenizer": {"path": self.tokenizer_path, "sha256": self.tokenizer_sha256,
                          "given": self.tokenizer_given},
            "state_dict_options": self.state_dict_options, "tracking_uri": self.tracking_uri,
            "training_run_id": self.training_run_id,
        }


def local_copy(path: str, scratch: Path) -> str:
    """A local file holding `path` (itself when local)."""
    if not is_uri(path):
        return path
    fs, inner = resolve(path)
    target = scratch / basename(path)
    with fs.open_input_stream(inner) as stream, open(target, "wb") as out:
        while chunk := stream.read(1 << 24):
            out.write(chunk)
    return str(target)


def _source_kind(source: str) -> str:
    if is_mlflow_uri(source):
        return "mlflow"
    fs, inner = resolve(source)
    info = fs.get_file_info(inner)
    if not is_uri(source) and _is_safetensors_export(source):
        return "safetensors"
    if info.type == pafs.FileType.File:
        return "file"
    if info.type == pafs.FileType.Directory or (is_uri(source) and info.type == pafs.FileType.NotFound):
        return "checkpoint"  # object stores list a "folder" only by its contents
    raise ModelSourceError(f"{source}: no such file or folder (a model is a checkpoint or run directory, a "
                           "model.pt or state dict file, or an MLflow model URI)")


def _is_safetensors_export(path: str) -> bool:
    try:
        safetensors_export_files(path)
    except FileNotFoundError:
        return False
    return True


def _plain_state_dict_config(state_dict: dict, activation: str) -> ModelConfig:
    """The config build_model_from_state_dict gives a plain state dict (pad id 0, as OpenAI's)."""
    config = model_config_from_state_dict(state_dict)
    config.activation = activation
    return config


def _checkpoint_facts(location: str, scratch: Path) -> tuple[ModelConfig, str | None, dict, str | None]:
    """(model config, the run's tokenizer path or None, version, its MLflow run id or None) of a checkpoint,
    read without its weights (mapped, not read; a remote checkpoint is downloaded into `scratch`)."""
    from clip_ray.worker.checkpoint import MODEL_FILE, load_training_state

    directory = checkpoint_directory(location, scratch)
    state = load_training_state(directory, mmap=True)
    if state["model_config"] is not None:
        model_config = from_dict(ModelConfig, state["model_config"])
    else:
        model_config = _plain_state_dict_config(state["model"], "quick_gelu")
    run_config = state.get("config") or {}
    tokenizer = (run_config.get("data") or {}).get("tokenizer") or None
    # The weights' digest, not the path, says which model this is: a copy elsewhere is the same model, and
    # another run's checkpoint at the same step is not.
    weights = file_sha256(str(directory / MODEL_FILE))
    return model_config, tokenizer, {"step": int(state["step"]), "weights_sha256": weights}, state.get("mlflow_run_id")


def _file_facts(path: str, scratch: Path, activation: str) -> tuple[ModelConfig, dict, dict]:
    """(model config, version, options for loading) of a model.pt or plain state dict file."""
    local = local_copy(path, scratch)
    payload = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    version = {"weights_sha256": file_sha256(local)}
    if isinstance(payload, dict) and "state_dict" in payload and "model_config" in payload:
        if payload["model_config"] is not None:
            return from_dict(ModelConfig, payload["model_config"]), version, {}
        payload = payload["state_dict"]
    # A plain state dict does not say its activation: it is the caller's to give, and part of the identity.
    return _plain_state_dict_config(payload, activation), version, {"activation": activation}


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


def _folder_tokenizer(folder: Path) -> str | None:
    try:
        return tokenizer_file(str(folder))
    except ModelSourceError:
        return None


def tokenizer_file(path: str) -> str:
    """The tokenizer file `path` names: itself, or the tokenizer.json / CLIP merges file in a folder."""
    candidate = Path(path)
    if candidate.is_dir():
        names = ["tokenizer.json", "bpe_simple_vocab_16e6.txt.gz", *sorted(p.name for p in candidate.glob("*.txt.gz"))]
        for name in names:
            if (candidate / name).is_file():
                return str(candidate / name)
        raise ModelSourceError(f"{path}: no tokenizer.json or CLIP merges file in this folder")
    if not candidate.is_file():
        raise ModelSourceError(f"tokenizer {path}: no such local file; pass --tokenizer with the model's own")
    return str(candidate)


def resolve_model(source: str, tokenizer: str | None = None, tracking_uri: str | None = None,
                  activation: str = "quick_gelu") -> ResolvedModel:
    """Pins `source` (see the module docstring) and loads its tokenizer; raises ModelSourceError
    naming what is missing. `activation` is for plain state dicts, which do not record it.
    `tracking_uri` (for MLflow sources) defaults as training's does: $MLFLOW_TRACKING_URI, else
    the local SQLite store."""
    source = str(source) if is_uri(source) or is_mlflow_uri(source) else local_absolute(str(source))
    kind = _source_kind(source)
    uri, options, run_id = None, {}, None
    with tempfile.TemporaryDirectory(prefix="clip-ray-resolve-") as scratch:
        if kind == "mlflow":
            from clip_ray.tracking.run import resolve_tracking_uri

            uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
            location, model_config, own_tokenizer, version = mlflow_facts(source, uri, Path(scratch))
            run_id = version["run_id"]
        elif kind == "safetensors":  # what `clip-ray export --to safetensors` writes
            weights, config_file = safetensors_export_files(source)
            location, own_tokenizer = str(weights.parent), _folder_tokenizer(weights.parent)
            model_config = from_dict(ModelConfig, json.loads(config_file.read_text()))
            version = {"weights_sha256": file_sha256(str(weights))}
        elif kind == "checkpoint":
            location = latest_checkpoint_location(source)
            model_config, own_tokenizer, version, run_id = _checkpoint_facts(location, Path(scratch))
        else:
            location, own_tokenizer = source, None
            model_config, version, options = _file_facts(source, Path(scratch), activation)
        named = tokenizer or own_tokenizer
        if not named:
            raise ModelSourceError(f"{source}: it does not say which tokenizer it was trained with; pass --tokenizer "
                                   "(a tokenizer.json or CLIP's bpe_simple_vocab_16e6.txt.gz)")
        path = tokenizer_file(local_absolute(named))
        loaded = load_tokenizer(path, model_config.text.context_length)
        digest = file_sha256(path)
        if tokenizer is None and kind == "mlflow":  # the downloaded copy goes with the scratch folder
            path = version["tokenizer_uri"]
    if loaded.vocab_size > model_config.text.vocab_size:
        raise ModelSourceError(f"tokenizer {path} has {loaded.vocab_size} tokens, the model of {source} "
                               f"only {model_config.text.vocab_size}: not the model's tokenizer")
    return ResolvedModel(source=source, kind=kind, location=location, model_config=model_config, tokenizer=loaded,
                         tokenizer_path=path, tokenizer_sha256=digest, tokenizer_given=tokenizer,
                         tracking_uri=uri, version=version, state_dict_options=options, training_run_id=run_id)
