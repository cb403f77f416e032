"""The `clip-ray` command line.

One argparse tree: `clip-ray GROUP COMMAND ...`. Each command group is added by
its own `add_<group>_commands(groups)` function, and each command sets `run`,
a function of the parsed arguments returning the exit status, so a new group
(train, eval, sweep, embed) is one more function and one more line in
`build_parser`. Heavy imports (Ray, torch) happen inside the `run` functions,
which keeps `clip-ray --help` fast. The scripts in jobs/ call `main` with their
command's words put in front.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Sequence

from clip_ray.config import ConfigError, SourceConfig, load_config, load_sweep_config
from clip_ray.data.formats.samples import DEFAULT_MAX_PIXELS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-ray", description="Distributed CLIP training on Ray.")
    groups = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    add_data_commands(groups)
    add_train_commands(groups)
    add_eval_commands(groups)
    add_sweep_commands(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ConfigError as err:
        # A config the command cannot run, found before Ray starts or by the job itself: one line, exit 2.
        name = " ".join(filter(None, (args.group, getattr(args, "command", None))))
        print(f"clip-ray {name}: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- shared arguments


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    ray = parser.add_argument_group("Ray")
    ray.add_argument("--ray-address", default=None,
                     help="cluster to connect to (default: $RAY_ADDRESS, else start a local one)")
    ray.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster started here")


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="shard pattern, directory or URI; for csv/coco the dataset folder")
    source = parser.add_argument_group("input")
    source.add_argument("--input-format", choices=["webdataset", "parquet", "csv", "coco"], default="webdataset")
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


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="folder (or URI) for the shards")
    output = parser.add_argument_group("output")
    output.add_argument("--output-format", choices=["tar", "parquet"], default="tar")
    output.add_argument("--samples-per-shard", type=int, default=1000)
    output.add_argument("--num-workers", type=int, default=None,
                        help="partitions processed at once (default: all the cluster's CPUs)")
    output.add_argument("--cpus-per-task", type=float, default=1.0)
    output.add_argument("--overwrite", action="store_true",
                        help="redo partitions a previous run finished (default: skip them)")
    output.add_argument("--validate-images", action=argparse.BooleanOptionalAction, default=True,
                        help="decode every image; drop and count the bad ones")
    output.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images count as too large")


def add_config_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    parser.add_argument("--config", default=None, help=f"YAML config file (default: {default_help})")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override config values, e.g. --set train.lr=1e-4 cluster.num_workers=4 "
                             "(values are YAML; repeatable)")


def _print_summary(summary: dict, keys: Sequence[str]) -> None:
    print(json.dumps({key: summary[key] for key in keys}, indent=2))


# --------------------------------------------------------------------------- clip-ray data ...


def add_data_commands(groups: argparse._SubParsersAction) -> None:
    data = groups.add_parser("data", help="convert and curate image-text data")
    commands = data.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="any supported input -> WebDataset tar or Parquet shards")
    add_source_arguments(convert)
    add_output_arguments(convert)
    convert.add_argument("--resize", type=int, default=None,
                         help="shrink images to this shorter side (JPEG re-encode); smaller ones are kept")
    convert.add_argument("--jpeg-quality", type=int, default=95)
    convert.add_argument("--max-failure-fraction", type=float, default=1.0,
                         help="exit with an error when more of the input is bad (default: only if all is)")
    add_ray_arguments(convert)
    convert.set_defaults(run=run_convert)

    curate = commands.add_parser("curate", help="CLIP-style query matching, per-query cap, image dedup")
    add_source_arguments(curate)
    add_output_arguments(curate)
    curate.add_argument("--queries", required=True, help="query list, one per line")
    curate.add_argument("--max-per-query", type=int, default=20_000)
    curate.add_argument("--seed", type=int, default=0, help="picks which pairs of a query over the cap stay")
    curate.add_argument("--min-words", type=int, default=0)
    curate.add_argument("--max-words", type=int, default=None)
    curate.add_argument("--min-chars", type=int, default=0)
    curate.add_argument("--max-chars", type=int, default=None)
    curate.add_argument("--dedup-images", action=argparse.BooleanOptionalAction, default=True,
                        help="drop pairs whose image bytes repeat an earlier pair's")
    add_ray_arguments(curate)
    curate.set_defaults(run=run_curate)


def run_convert(args: argparse.Namespace) -> int:
    from clip_ray.data.offline.convert import ConvertOptions, convert

    options = ConvertOptions(
        samples_per_shard=args.samples_per_shard, output_format=args.output_format,
        validate_images=args.validate_images, max_pixels=args.max_pixels, resize=args.resize,
        jpeg_quality=args.jpeg_quality, num_workers=args.num_workers, cpus_per_task=args.cpus_per_task,
        overwrite=args.overwrite, max_failure_fraction=args.max_failure_fraction,
    )
    return _run_data_job(args, "convert", lambda: convert(source_from_args(args), args.output, options),
                         ["samples_written", "shards_written", "failures", "partitions_reused", "duration_s"])


def run_curate(args: argparse.Namespace) -> int:
    from clip_ray.data.offline.curate import CurateOptions, curate

    options = CurateOptions(
        max_per_query=args.max_per_query, seed=args.seed, min_words=args.min_words, max_words=args.max_words,
        min_chars=args.min_chars, max_chars=args.max_chars, dedup_images=args.dedup_images,
        validate_images=args.validate_images, max_pixels=args.max_pixels, samples_per_shard=args.samples_per_shard,
        output_format=args.output_format, num_workers=args.num_workers, cpus_per_task=args.cpus_per_task,
        overwrite=args.overwrite,
    )
    return _run_data_job(args, "curate", lambda: curate(source_from_args(args), args.queries, args.output, options),
                         ["pairs_seen", "kept", "dropped", "queries_matched", "duration_s"])


def _run_data_job(args: argparse.Namespace, name: str, job, summary_keys: Sequence[str]) -> int:
    """Runs `job()` on the Ray cluster of the arguments; a DataError is one line on stderr and exit 1."""
    from clip_ray.data.formats import DataError
    from clip_ray.ray_session import ray_session

    with ray_session(args.ray_address, args.num_cpus):
        try:
            summary = job()
        except DataError as err:
            print(f"clip-ray data {name}: {err}", file=sys.stderr)
            return 1
    _print_summary(summary, summary_keys)
    return 0


# --------------------------------------------------------------------------- clip-ray train / eval


def add_train_commands(groups: argparse._SubParsersAction) -> None:
    train = groups.add_parser("train", help="train CLIP with Ray Train, tracked in MLflow",
                              description="Train (or resume) one run. Without --config: the demo, which "
                                          "generates its data and finishes in a few minutes on 2 CPU cores.")
    add_config_arguments(train, "configs/demo-cpu.yaml, the demo")
    train.add_argument("--demo-data-dir", default="demo-data",
                       help="where a config with a demo section puts its generated data (default: %(default)s)")
    add_ray_arguments(train)
    train.set_defaults(run=run_train)


def add_eval_commands(groups: argparse._SubParsersAction) -> None:
    evaluate = groups.add_parser("eval", help="evaluate a checkpoint or an MLflow model",
                                 description="Zero-shot accuracy on data.zeroshot_dir and retrieval recall "
                                             "(and loss) on data.val of the config.")
    evaluate.add_argument("model", help="a checkpoint directory, a run directory (its latest checkpoint), "
                                        "or an MLflow model URI (runs:/ID/model, models:/NAME/VERSION, models:/ID)")
    add_config_arguments(evaluate, "configs/demo-cpu.yaml with its demo data")
    evaluate.add_argument("--demo-data-dir", default="demo-data", help="demo data of a config with a demo section")
    evaluate.add_argument("--json", dest="json_path", default=None, help="also write the metrics to this file")
    add_ray_arguments(evaluate)
    evaluate.set_defaults(run=run_eval)


def prepare_job_of(args: argparse.Namespace):
    """The prepared job of a train/eval command (clip_ray.driver.prepare): loaded, checked and
    prepared here, once, before Ray starts; a bad value is a ConfigError naming its key."""
    from clip_ray.driver.demo import default_config_path
    from clip_ray.driver.prepare import prepare_job

    return prepare_job(load_config(args.config or default_config_path(), args.overrides), args.demo_data_dir)


def print_train_summary(outcome, dataset=None) -> None:
    """What a person reads at the end of a job: before/after metrics, where the model and the run are."""
    from clip_ray.driver.demo import demo_report
    from clip_ray.eval.report import metrics_table
    from clip_ray.tracking.run import mlflow_ui_hint

    summary = outcome.summary
    resumed = f" (resumed at step {outcome.resumed_from_step})" if outcome.resumed_from_step is not None else ""
    print(f"\nRun {outcome.run_path}: {summary.get('step', '?')} steps, {summary.get('samples_seen', '?')} samples"
          f"{resumed}")
    columns = {"before": outcome.before, "after": outcome.final}
    print(demo_report(*columns.values(), dataset) if dataset is not None else metrics_table(columns))
    print(f"Checkpoint: {outcome.checkpoint_path}")
    if outcome.mlflow_run_id:
        print(f"MLflow run {outcome.mlflow_run_id} in {outcome.tracking_uri}")
    else:
        print(f"MLflow run: none, {outcome.tracking_uri} never answered (metrics are in the checkpoints)")
    print(f"  to browse the runs: {mlflow_ui_hint(outcome.tracking_uri)}")


def run_train(args: argparse.Namespace) -> int:
    import ray.train

    from clip_ray.driver.trainer import train
    from clip_ray.ray_session import ray_session

    started = time.perf_counter()
    job = prepare_job_of(args)  # before Ray starts: a bad path costs a second, not a cluster start
    with ray_session(args.ray_address, args.num_cpus):
        try:
            outcome = train(job)
        except ray.train.TrainingFailedError as err:
            print(f"clip-ray train: training failed: {err}", file=sys.stderr)
            return 1
    print_train_summary(outcome, job.demo)
    print(f"Wall time: {time.perf_counter() - started:.0f} s")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from clip_ray.driver.evaluate_model import evaluate_model
    from clip_ray.eval.report import metrics_table
    from clip_ray.ray_session import ray_session

    job = prepare_job_of(args)
    with ray_session(args.ray_address, args.num_cpus):
        try:
            metrics = evaluate_model(job.config, args.model)
        except FileNotFoundError as err:
            print(f"clip-ray eval: {err}", file=sys.stderr)
            return 2
    print(metrics_table({"model": metrics}))
    print(json.dumps(metrics, indent=2, sort_keys=True))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
    return 0


def add_sweep_commands(groups: argparse._SubParsersAction) -> None:
    sweep = groups.add_parser("sweep", help="a scaling sweep: Ray Tune over training jobs, then the fits",
                              description="Trains the base job of a sweep file at every width x data scale "
                                          "(x learning rate) with Ray Tune, then fits scaling laws. Running "
                                          "the same sweep name again resumes it.")
    sweep.add_argument("--config", required=True, help="sweep YAML (e.g. configs/sweep-demo-cpu.yaml)")
    sweep.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                       help="sweep.KEY=VALUE for the sweep section, any other key for the base job")
    sweep.add_argument("--demo-data-dir", default="demo-data", help="demo data of a base job with a demo section")
    add_ray_arguments(sweep)
    sweep.set_defaults(run=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from clip_ray.driver.sweep import run_sweep as run
    from clip_ray.ray_session import ray_session

    started = time.perf_counter()
    file = load_sweep_config(args.config, args.overrides)
    with ray_session(args.ray_address, args.num_cpus):
        outcome = run(file, args.demo_data_dir)
    columns = [c for c in ("trial_id", "params", "samples_seen", "compute", "val_loss", "zeroshot_top1",
                           "wall_time_s", "status") if c in outcome.results]
    print(outcome.results[columns].to_string(index=False) if len(outcome.results) else "no trial finished")
    print(f"Sweep directory: {outcome.sweep_dir} (results.csv, curves.csv, analysis/)")
    if outcome.parent_run_id:
        print(f"MLflow parent run {outcome.parent_run_id} in {outcome.tracking_uri}")
    print(f"Wall time: {time.perf_counter() - started:.0f} s")
    return 1 if outcome.errors else 0


if __name__ == "__main__":
    sys.exit(main())
