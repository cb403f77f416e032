"""clip-ray export: a trained model out to OpenCLIP, Hugging Face transformers, ONNX or plain safetensors.

    clip-ray export MODEL --to openclip hf onnx safetensors --output DIR [--register NAME]

Exit status: 0 when every format asked for was written; 2 for a source or request clip-ray cannot use, or
a format that cannot hold the model (transformers and a ResNet: the others are still written); 1 when a
written format failed its check (ONNX against PyTorch).
"""

from __future__ import annotations

import argparse
import json
import sys

from clip_ray.cli.common import add_tokenizer_arguments
from clip_ray.cli.evaluate import MODEL_HELP

FORMATS = ("openclip", "hf", "onnx", "safetensors")  # clip_ray.driver.export.FORMATS, without importing torch here
DTYPES = ("float32", "float16", "bfloat16")


def add_export_commands(groups: argparse._SubParsersAction) -> None:
    export = groups.add_parser(
        "export", help="write a model for OpenCLIP, Hugging Face transformers, ONNX runtimes or as safetensors",
        description="Each format goes into its own folder under --output (openclip/, hf/, onnx/, safetensors/) "
                    "with a README.md saying how to load it and a manifest.json naming the model it came from. "
                    "ONNX graphs are checked with onnxruntime against PyTorch. A format that cannot hold the "
                    "model (transformers' CLIPModel has no ResNet image tower and no logit bias) is reported, "
                    "and the other formats are still written.")
    export.add_argument("model", help=MODEL_HELP)
    export.add_argument("--to", dest="formats", nargs="+", action="extend", required=True, metavar="FORMAT",
                        choices=[*FORMATS, "all"], help=f"one or more of {', '.join(FORMATS)}, or all")
    export.add_argument("--output", required=True, help="folder (local or a URI) to write the formats' folders in")
    export.add_argument("--overwrite", action="store_true", help="replace format folders that already exist")
    export.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of the weight files (default: %(default)s; ONNX graphs stay float32)")
    export.add_argument("--onnx-tolerance", type=float, default=1e-4,
                        help="largest abs difference of onnxruntime's features from PyTorch's (default: %(default)s)")
    add_tokenizer_arguments(export)
    export.add_argument("--tracking-uri", default=None,
                        help="MLflow store to read an MLflow model from and to register in "
                             "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    export.add_argument("--register", dest="register_as", default=None, metavar="NAME",
                        help="also register the written folders as a new version of this MLflow registered model")
    export.add_argument("--json", dest="json_path", default=None, help="also write the summary to this file")
    export.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from clip_ray.driver.export import export_model, export_summary
    from clip_ray.inference.models import ModelSourceError, resolve_model

    formats = list(FORMATS) if "all" in args.formats else args.formats
    try:
        model = resolve_model(args.model, args.tokenizer, args.tracking_uri, args.state_dict_activation)
    except ModelSourceError as err:
        print(f"clip-ray export: {err}", file=sys.stderr)
        return 2
    outcome = export_model(model, formats, args.output, dtype=args.dtype, onnx_tolerance=args.onnx_tolerance,
                           overwrite=args.overwrite, register_as=args.register_as, tracking_uri=args.tracking_uri)
    print(f"\nExported {model.model_config.name} from {model.location} ({outcome.seconds:.0f} s)")
    for result in outcome.results:
        if result.ok:
            checks = "".join(f"; {c['file']} max abs diff {c['max_abs_diff']:.2g}" for c in result.checks)
            print(f"  {result.format:<12} {result.folder} ({len(result.files)} files{checks})")
        else:
            print(f"  {result.format:<12} not written")
    for result in outcome.results:
        if not result.ok:
            print(f"clip-ray export: {result.format}: {result.refused or result.failed}", file=sys.stderr)
    if outcome.registered:
        registered = outcome.registered
        print(f"Registered {registered['model_uri']} (logged model {registered['model_id']}) "
              f"at {registered['tracking_uri']}")
        print(f"  its run: {registered['run_link']}")
    if args.json_path:
        with open(args.json_path, "w") as file:
            json.dump(export_summary(outcome), file, indent=2)
    if any(result.failed for result in outcome.results):
        return 1
    return 2 if any(result.refused for result in outcome.results) else 0
