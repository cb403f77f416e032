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
`tokenizer` artifact, else the folder of an exported model holds it.

MLflow models are read by `mlflow_models.py`, what all sources share is in `sources.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
from torch import nn

from clip_ray.config import ModelConfig, TrackingConfig, from_dict
from clip_ray.inference.mlflow_models import (  # noqa: F401 (is_mlflow_uri, load_mlflow_model: imported from here)
    exported_program_state_dict, is_mlflow_uri, load_exported_program, load_mlflow_model, mlflow_facts,
)
from clip_ray.inference.safetensors_export import load_safetensors_export, safetensors_export_files
from clip_ray.inference.sources import (  # noqa: F401 (ModelSourceError and tokenizer_file: imported from here)
    ModelSourceError, file_sha256, folder_tokenizer, local_copy, tokenizer_file,
)
from clip_ray.model import model_config_from_state_dict
from clip_ray.model.tokenizer import Tokenizer, load_tokenizer
from clip_ray.storage import is_uri, join, local_absolute, resolve

# MLflow, Ray Train and the checkpoint module (torch.distributed's) are imported where they are used: together
# they take seconds to import, and an encoder actor or a search needs one of them at most.

log = logging.getLogger("clip_ray.inference")

# Ray Train V2 writes this file into the run directory after every checkpoint.
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


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


# --------------------------------------------------------------------------- resolving a source


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
            location, own_tokenizer = str(weights.parent), folder_tokenizer(weights.parent)
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
