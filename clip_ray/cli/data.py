"""`clip-ray data convert|curate`: offline Ray jobs over whole data sets (clip_ray.data.offline)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from clip_ray.cli.common import add_ray_arguments, add_source_arguments, print_summary, source_from_args
from clip_ray.data.formats.samples import DEFAULT_MAX_PIXELS


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
    print_summary(summary, summary_keys)
    return 0
