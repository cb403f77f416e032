"""Arguments several `clip-ray` commands share: Ray, an input source, a config file; printing a summary."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

from clip_ray.config import SourceConfig


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--ray-address", default=None,
                     help="cluster to connect to (default: $RAY_ADDRESS, else start a local one)")
    ray.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster started here")


SOURCE_FORMATS = ("webdataset", "parquet", "csv", "coco")


def add_source_arguments(parser: argparse.ArgumentParser, formats: Sequence[str] = SOURCE_FORMATS,
                         required: bool = True) -> None:
    folder = "; for imagefolder the tree of class folders" if "imagefolder" in formats else ""
    parser.add_argument("input", nargs=None if required else "?",
                        help="shard pattern, directory or URI; for csv/coco the dataset folder" + folder)
    source = parser.add_argument_group("input")
    source.add_argument("--input-format", choices=list(formats), default="webdataset")
    source.add_argument("--captions-file", default="captions.csv",
                        help="csv/coco: captions table relative to INPUT (default: %(default)s)")
    source.add_argument("--images-dir", default="images", help="csv/coco: image folder relative to INPUT")
    source.add_argument("--split-file", default=None, help="csv/coco: file of image names to keep")
    source.add_argument("--image-column", default="image", help="parquet/csv image column")
    source.add_argument("--caption-column", default="caption", help="parquet/csv caption column")


def source_from_args(args: argparse.Namespace) -> SourceConfig:
    return SourceConfig(path=args.input, format=args.input_format, captions_file=args.captions_file,
                        images_dir=args.images_dir, split_file=args.split_file,
                        image_column=args.image_column, caption_column=args.caption_column)


def add_config_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--config", default=None, help=f"YAML config file (default: {default_help})")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override config values, e.g. --set train.lr=1e-4 cluster.num_workers=4 "
                             "(values are YAML; repeatable)")


def add_tokenizer_arguments(parser, tokenizer_help: str = "the model's tokenizer.json or CLIP merges file "
                            "(default: the one its training run recorded)") -> None:
    """--tokenizer and --state-dict-activation: what a model source may not record about itself."""
    parser.add_argument("--tokenizer", default=None, help=tokenizer_help)
    parser.add_argument("--state-dict-activation", choices=["quick_gelu", "gelu"], default="quick_gelu",
                        help="activation of a plain state dict, which does not record it (OpenAI's: quick_gelu)")


def print_mlflow_run(outcome: Any) -> None:
    """Where an evaluation-like command's MLflow run is: its id, how to browse, the link to it."""
    from mlflow import MlflowClient

    from clip_ray.tracking.run import mlflow_run_link, mlflow_ui_hint

    print(f"MLflow run {outcome.run_id} in experiment {outcome.experiment!r} at {outcome.tracking_uri}")
    print(f"  to browse the runs: {mlflow_ui_hint(outcome.tracking_uri)}")
    experiment_id = MlflowClient(outcome.tracking_uri).get_run(outcome.run_id).info.experiment_id
    print(f"  this run: {mlflow_run_link(outcome.tracking_uri, experiment_id, outcome.run_id)}")


def print_summary(summary: dict, keys: Sequence[str]) -> None:
    print(json.dumps({key: summary[key] for key in keys}, indent=2))


def run_on_model(command: str, args: argparse.Namespace, resolve: Callable[[], Any],
                 job: Callable[[Any], Any]) -> tuple[int, Any, Any]:
    """(exit status, model, result) of a command that uses a trained model: `resolve` pins it before Ray starts
    (a wrong path or a missing tokenizer costs a second, not a cluster start), then `job(model)` runs in a Ray
    session. A bad source is one line and status 2, data too broken to use one line and status 1."""
    from clip_ray.data.formats import DataError
    from clip_ray.inference.models import ModelSourceError
    from clip_ray.ray_session import ray_session

    try:
        model = resolve()
    except ModelSourceError as err:
        print(f"clip-ray {command}: {err}", file=sys.stderr)
        return 2, None, None
    with ray_session(args.ray_address, args.num_cpus):
        try:
            return 0, model, job(model)
        except DataError as err:
            print(f"clip-ray {command}: {err}", file=sys.stderr)
            return 1, model, None
