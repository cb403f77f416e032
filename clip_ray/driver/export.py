"""`clip-ray export`: one trained model out to OpenCLIP, Hugging Face transformers, ONNX and plain safetensors.

    OUTPUT/openclip/      open_clip_model.safetensors, open_clip_config.json, clip-ray-<name>.json, tokenizer
    OUTPUT/hf/            config.json, model.safetensors, preprocessor_config.json, tokenizer files (CLIPModel)
    OUTPUT/onnx/          image_encoder.onnx, text_encoder.onnx (checked with onnxruntime), tokenizer
    OUTPUT/safetensors/   model.safetensors, model_config.json, tokenizer (clip-ray's own, for init_from)

Each folder also gets manifest.json (the model's identity, the files with their SHA-256, the checks) and a
README.md saying how to load it. A folder is written whole in a staging folder beside it and then moved into
place, so an interrupted export leaves no half folder behind. A format that cannot hold the model (a ResNet
or a logit bias for transformers) is reported and skipped; the others are still written. With `register_as`,
the written folders become the artifacts of one MLflow logged model, registered as a new version.

The weights come from `ResolvedModel.state_dict()` (OpenAI's layout: every model source clip-ray reads),
the formats' files from clip_ray/driver/export_formats.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clip_ray.config import ConfigError, TrackingConfig
from clip_ray.driver.export_formats import WRITERS, ExportBundle, Written
from clip_ray.driver.export_onnx import DEFAULT_TOLERANCE, OnnxMismatch
from clip_ray.inference.models import ResolvedModel
from clip_ray.model.interop import UnsupportedExport
from clip_ray.storage import is_uri, join, resolve

log = logging.getLogger("clip_ray.driver.export")

FORMATS = tuple(WRITERS)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the `export` extra
MANIFEST_FILE = "manifest.json"
README_FILE = "README.md"
EXPORT_EXPERIMENT = "clip-ray-export"
LOGGED_MODEL_NAME = "clip-ray-export"
_TITLES = {"openclip": "OpenCLIP", "hf": "Hugging Face transformers CLIPModel",
           "onnx": "ONNX (image and text encoders)", "safetensors": "safetensors (clip-ray's own layout)"}


@dataclass
class FormatResult:
    """One format: where it went and what it holds, or why it was not written."""

    format: str
    folder: str
    files: list[str] = field(default_factory=list)  # relative to the folder
    refused: str | None = None  # the format cannot hold this model (UnsupportedExport)
    failed: str | None = None  # written, but its check failed (the folder is not kept)
    checks: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.refused is None and self.failed is None


@dataclass
class ExportOutcome:
    output: str
    model: dict  # the source's identity
    results: list[FormatResult]
    seconds: float = 0.0
    registered: dict | None = None  # name, version, model_uri, model_id, run_id, experiment_id, run_link

    @property
    def written(self) -> list[FormatResult]:
        return [result for result in self.results if result.ok]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(fmt: str, folder: Path, written: Written, model: ResolvedModel, dtype: str) -> dict:
    return {
        "format": fmt, "written_by": "clip-ray export", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dtype": "float32" if fmt == "onnx" else dtype,
        "model": model.identity(), "architecture": model.model_config.architecture(),
        "files": {str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": _sha256(path)}
                  for path in written.files},
        "load": written.load, "notes": written.notes, "checks": written.checks, **written.extra,
    }


def _readme(manifest: dict) -> str:
    model = manifest["model"]
    lines = [f"# {model['name']}: {_TITLES[manifest['format']]}", "",
             f"Exported by `clip-ray export` on {manifest['created']} from {model['source']} ({model['kind']}; "
             f"weights {json.dumps(model['version'])}), {manifest['dtype']}.", "",
             "## Loading", "", "```python", manifest["load"].replace("{folder}", "."), "```", ""]
    if manifest["notes"]:
        lines += ["## Notes", "", *(f"- {note}" for note in manifest["notes"]), ""]
    if manifest["checks"]:
        lines += ["## Checks", "", *(f"- {c['file']}: onnxruntime against PyTorch on {c['batch']} rows, max abs "
                                     f"difference {c['max_abs_diff']:.3g}" for c in manifest["checks"]), ""]
    lines += ["## Files", "", *(f"- `{name}` ({facts['bytes']} bytes)" for name, facts in manifest["files"].items()),
              "", f"The model's identity (source, weights digest, tokenizer) is in {MANIFEST_FILE}.", ""]
    return "\n".join(lines)


def _check_request(formats: list[str], dtype: str, onnx_tolerance: float, output: str, overwrite: bool) -> None:
    unknown = [fmt for fmt in formats if fmt not in WRITERS]
    if unknown or not formats:
        raise ConfigError(f"export formats {unknown or formats}: choose from {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if not onnx_tolerance >= 0:
        raise ConfigError(f"onnx tolerance {onnx_tolerance}: must be >= 0")
    if "onnx" in formats:
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"--to onnx needs {', '.join(missing)} (torch.onnx's exporter and the onnxruntime "
                              "check): pip install 'clip-ray[export]'")
    if overwrite:
        return
    fs, root = resolve(output)
    import pyarrow.fs as pafs

    taken = [fmt for fmt in formats if fs.get_file_info(f"{root}/{fmt}").type != pafs.FileType.NotFound]
    if taken:
        raise ConfigError(f"{', '.join(join(output, fmt) for fmt in taken)} already exist; choose another --output "
                          "or pass --overwrite")


def _place(staged: Path, output: str, fmt: str) -> Path | None:
    """Moves (local) or uploads (a URI) a finished folder to OUTPUT/fmt; the local path it ends at, if any."""
    if is_uri(output):
        import pyarrow.fs as pafs

        fs, root = resolve(output)
        fs.delete_dir_contents(f"{root}/{fmt}", missing_dir_ok=True)
        fs.create_dir(f"{root}/{fmt}", recursive=True)
        pafs.copy_files(str(staged), f"{root}/{fmt}", destination_filesystem=fs)
        return None
    target = Path(output) / fmt
    if target.exists():
        shutil.rmtree(target)
    staged.rename(target)
    return target


def export_model(model: ResolvedModel, formats: list[str], output: str, *, dtype: str = "float32",
                 onnx_tolerance: float = DEFAULT_TOLERANCE, overwrite: bool = False, register_as: str | None = None,
                 tracking_uri: str | None = None, check_images: torch.Tensor | None = None) -> ExportOutcome:
    """Writes `model` in each of `formats` under `output` (local or a URI); see the module docstring.
    A bad request (format, dtype, an existing folder without `overwrite`) is a ConfigError before any work."""
    formats = list(dict.fromkeys(formats))
    _check_request(formats, dtype, onnx_tolerance, output, overwrite)
    started = time.perf_counter()
    bundle = ExportBundle(model.model_config, model.state_dict(), model.tokenizer, DTYPES[dtype], onnx_tolerance,
                          check_images)
    results: list[FormatResult] = []
    placed: dict[str, Path] = {}
    staging_parent = None if is_uri(output) else Path(output)
    if staging_parent is not None:
        staging_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".clip-ray-export-", dir=staging_parent) as stage:
        for fmt in formats:
            folder = Path(stage) / fmt
            folder.mkdir()
            result = FormatResult(fmt, join(output, fmt))
            results.append(result)
            begun = time.perf_counter()
            try:
                written = WRITERS[fmt](bundle, folder)
            except UnsupportedExport as err:
                result.refused = str(err)
                log.warning("export to %s refused: %s", fmt, err)
                continue
            except OnnxMismatch as err:
                result.failed = str(err)
                log.error("export to %s failed its check: %s", fmt, err)
                continue
            manifest = _manifest(fmt, folder, written, model, dtype)
            (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            (folder / README_FILE).write_text(_readme(manifest))
            result.files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            result.checks = written.checks
            placed[fmt] = _place(folder, output, fmt) or folder
            log.info("wrote %s (%d files) in %.1f s", result.folder, len(result.files), time.perf_counter() - begun)
        outcome = ExportOutcome(output, model.identity(), results)
        if register_as and outcome.written:
            outcome.registered = register_export(outcome, placed, register_as, tracking_uri, dtype)
    outcome.seconds = time.perf_counter() - started
    return outcome


def register_export(outcome: ExportOutcome, folders: dict[str, Path], name: str, tracking_uri: str | None,
                    dtype: str) -> dict:
    """A new version of registered model `name` whose artifacts are the written folders (one per format):
    an MLflow logged model in experiment clip-ray-export, made by a run that records the source's identity."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from clip_ray.tracking.export import register_clip_model
    from clip_ray.tracking.run import (
        flatten_params, log_new_params, mlflow_run_link, resolve_tracking_uri, resume_or_create_run, source_tags,
    )

    uri = resolve_tracking_uri(TrackingConfig(tracking_uri=tracking_uri))
    client = MlflowClient(uri)
    formats = [result.format for result in outcome.written]
    tags = {**source_tags("export"), "clip_ray.export.formats": ",".join(formats)}
    run = resume_or_create_run(client, TrackingConfig(experiment=EXPORT_EXPERIMENT, tags=tags), uri, None,
                               f"export-{name}")
    run_id, experiment_id = run.info.run_id, run.info.experiment_id
    try:
        params = {"formats": ",".join(formats), "dtype": dtype, "output": outcome.output,
                  **flatten_params(outcome.model, "model")}
        log_new_params(client, run, {key: value for key, value in params.items() if value not in ("", "null")})
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"onnx/{check['input']}_max_abs_diff", check["max_abs_diff"], now, 0)
                                          for result in outcome.written for check in result.checks])
        logged = client.create_logged_model(experiment_id, name=LOGGED_MODEL_NAME, source_run_id=run_id,
                                            params={"formats": ",".join(formats), "dtype": dtype,
                                                    "config_sha256": outcome.model["config_sha256"]})
        for fmt in formats:
            client.log_model_artifacts(logged.model_id, str(folders[fmt]), fmt)
        client.finalize_logged_model(logged.model_id, "READY")
        version = register_clip_model(uri, f"models:/{logged.model_id}", name)
        identity = outcome.model
        for key, value in {"formats": ",".join(formats), "dtype": dtype, "source": identity["source"],
                           "config_sha256": identity["config_sha256"],
                           "weights": json.dumps(identity["version"], sort_keys=True)}.items():
            client.set_model_version_tag(name, str(version), f"clip_ray.{key}", value)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return {"name": name, "version": str(version), "model_uri": f"models:/{name}/{version}",
            "model_id": logged.model_id, "run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri,
            "run_link": mlflow_run_link(uri, experiment_id, run_id)}


def export_summary(outcome: ExportOutcome) -> dict:
    """The outcome as JSON values (what the CLI prints last)."""
    return {"output": outcome.output, "seconds": round(outcome.seconds, 1),
            "model": {key: outcome.model[key] for key in ("source", "kind", "name", "config_sha256")},
            "formats": {r.format: {"folder": r.folder, "files": r.files, "refused": r.refused, "failed": r.failed,
                                   "checks": r.checks} for r in outcome.results},
            "registered": outcome.registered}
