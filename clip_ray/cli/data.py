"""`clip-ray data convert|curate`: offline Ray jobs over whole data sets (clip_ray.data.offline)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from clip_ray.cli.common import (
    add_ray_arguments, add_source_arguments, print_summary, run_on_model, source_from_args,
)
from clip_ray.cli.embed import MODEL_HELP
from clip_ray.config.clip_score import ClipScoreConfig
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


EVAL_FORMATS = ("imagefolder", "webdataset", "parquet", "csv", "coco")
EVAL_SOURCE_KEYS = ("captions_file", "images_dir", "split_file", "image_column", "caption_column")


def eval_images_from_spec(spec: str):
    """The evaluation set a --exclude-images value names (see its help); ConfigError naming the value if malformed."""
    from clip_ray.config import ConfigError, SourceConfig
    from clip_ray.data.offline.overlap import EvalImages

    kind, colon, rest = spec.partition(":")
    path, *options = rest.split(",")
    if not colon or kind not in EVAL_FORMATS or not path:
        raise ConfigError(f"--exclude-images {spec!r}: expected FORMAT:PATH[,KEY=VALUE...] with FORMAT one of "
                          f"{', '.join(EVAL_FORMATS)}")
    fields = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or key not in EVAL_SOURCE_KEYS or kind == "imagefolder":
            raise ConfigError(f"--exclude-images {spec!r}: {option!r} is not KEY=VALUE with KEY one of "
                              f"{', '.join(EVAL_SOURCE_KEYS)} (an imagefolder takes none)")
        fields[key] = value
    if kind == "imagefolder":
        return EvalImages(image_folder=path)
    return EvalImages(source=SourceConfig(path=path, format=kind, **fields))


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

    curate = commands.add_parser("curate", help="CLIP-style query matching, per-query cap, image dedup, "
                                                 "CLIP-score filter")
    add_source_arguments(curate)
    add_output_arguments(curate)
    curate.add_argument("--queries", default=None,
                        help="query list, one per line (optional with a CLIP-score filter)")
    curate.add_argument("--max-per-query", type=int, default=20_000,
                        help="t: rarest keeps at most t pairs per query; metaclip keeps a query's pairs with "
                             "probability min(1, t / its matches)")
    curate.add_argument("--balance", choices=["rarest", "metaclip"], default="rarest",
                        help="rarest: CLIP's cap, a pair counts toward its rarest query; metaclip: MetaCLIP's "
                             "per-query sampling, a pair stays when any of its queries draws it")
    curate.add_argument("--exclude-images", metavar="FORMAT:PATH[,KEY=VALUE...]", action="append", default=[],
                        help="drop training pairs whose image bytes equal an image of this evaluation set (fate "
                             "eval_overlap); FORMAT: " + ", ".join(EVAL_FORMATS) + "; KEY: " +
                             ", ".join(EVAL_SOURCE_KEYS) + " (e.g. csv:data/flickr8k,split_file=splits/test.txt); "
                             "repeatable")
    curate.add_argument("--near-duplicate-threshold", metavar="T", type=float, default=None,
                        help="also drop pairs whose image embedding under --clip-model has a cosine >= T (in [-1, 1]) "
                             "with an --exclude-images image: re-encoded or resized copies (fate eval_overlap); runs "
                             "on the --clip-* actor settings, with or without a CLIP-score threshold")
    curate.add_argument("--seed", type=int, default=0, help="picks which pairs of a query over the cap stay")
    curate.add_argument("--min-words", type=int, default=0)
    curate.add_argument("--max-words", type=int, default=None)
    curate.add_argument("--min-chars", type=int, default=0)
    curate.add_argument("--max-chars", type=int, default=None)
    curate.add_argument("--dedup-images", action=argparse.BooleanOptionalAction, default=True,
                        help="drop pairs whose image bytes repeat an earlier pair's")
    add_clip_score_arguments(curate)
    add_ray_arguments(curate)
    curate.set_defaults(run=run_curate)
    add_queries_command(commands)


# ClipScoreConfig field -> its flag, so a bad value's error names the flag.
CLIP_SCORE_FLAGS = {
    "model": "--clip-model", "tokenizer": "--clip-tokenizer", "tracking_uri": "--clip-tracking-uri",
    "state_dict_activation": "--clip-state-dict-activation", "min_score": "--min-clip-score",
    "top_fraction": "--clip-top-fraction", "actors": "--clip-actors", "cpus_per_actor": "--clip-cpus-per-actor",
    "gpus_per_actor": "--clip-gpus-per-actor", "decode_cpus": "--clip-decode-cpus", "batch_size": "--clip-batch-size",
    "precision": "--clip-precision",
}


def add_clip_score_arguments(parser: argparse.ArgumentParser) -> None:
    clip = parser.add_argument_group(
        "CLIP-score filter", "keep pairs whose image-text cosine under a CLIP model is high (DataComp's baseline); "
                             "scored after the caption and query steps, before dedup and the per-query cap")
    flag = CLIP_SCORE_FLAGS
    clip.add_argument(flag["model"], default=None, help="the scoring model: " + MODEL_HELP)
    clip.add_argument(flag["tokenizer"], default=None,
                      help="its tokenizer.json or CLIP merges file (default: the one its training run recorded)")
    clip.add_argument(flag["tracking_uri"], default=None, help="MLflow server of an MLflow model")
    clip.add_argument(flag["state_dict_activation"], choices=["quick_gelu", "gelu"], default="quick_gelu",
                      help="activation of a plain state dict (OpenAI's: quick_gelu)")
    clip.add_argument(flag["min_score"], type=float, default=None, help="keep pairs whose cosine is >= this")
    clip.add_argument(flag["top_fraction"], type=float, default=None,
                      help="keep the best this fraction of the pairs scored: ceil(fraction x scored), ties to the "
                           "earlier pair")
    clip.add_argument(flag["actors"], type=int, default=1, help="encoder actors (each loads the model once)")
    clip.add_argument(flag["cpus_per_actor"], type=float, default=1.0)
    clip.add_argument(flag["gpus_per_actor"], type=float, default=0.0,
                      help="GPU share of an actor, e.g. 0.25 puts four on a GPU (default: CPU only)")
    clip.add_argument(flag["decode_cpus"], type=float, default=1.0,
                      help="CPUs of one read + decode task; when equal to --clip-cpus-per-actor (and no GPU), Ray Data "
                           "runs the decoding inside the actors")
    clip.add_argument(flag["batch_size"], type=int, default=256, help="pairs per encoder call")
    clip.add_argument(flag["precision"], choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                      help="encoder autocast (auto: fp16 on a GPU, fp32 on a CPU)")


def clip_score_from_args(args: argparse.Namespace) -> ClipScoreConfig | None:
    """The ClipScoreConfig the flags ask for, checked (errors name the flags), or None without any."""
    if args.clip_model is None and args.min_clip_score is None and args.clip_top_fraction is None:
        return None
    config = ClipScoreConfig(
        model=args.clip_model or "", tokenizer=args.clip_tokenizer, tracking_uri=args.clip_tracking_uri,
        state_dict_activation=args.clip_state_dict_activation, min_score=args.min_clip_score,
        top_fraction=args.clip_top_fraction, actors=args.clip_actors, cpus_per_actor=args.clip_cpus_per_actor,
        gpus_per_actor=args.clip_gpus_per_actor, decode_cpus=args.clip_decode_cpus, batch_size=args.clip_batch_size,
        precision=args.clip_precision)
    # With --near-duplicate-threshold the model embeds images for that filter: a score rule is optional.
    near_duplicates_only = getattr(args, "near_duplicate_threshold", None) is not None and \
        config.min_score is None and config.top_fraction is None
    config.validate(names=CLIP_SCORE_FLAGS, require_rule=not near_duplicates_only)
    return config


def check_near_duplicate_flags(args: argparse.Namespace) -> None:
    """--near-duplicate-threshold's own checks (ConfigError naming it), before Ray or a model is touched."""
    from clip_ray.config import ConfigError
    from clip_ray.data.offline.overlap import NearDuplicateFilter

    flag = "--near-duplicate-threshold"
    if args.near_duplicate_threshold is None:
        return
    try:
        NearDuplicateFilter(scorer=None, threshold=args.near_duplicate_threshold).validate()
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None
    if args.clip_model is None:
        raise ConfigError(f"{flag}: needs {CLIP_SCORE_FLAGS['model']}, the model whose image embeddings it compares")
    if not args.exclude_images:
        raise ConfigError(f"{flag}: needs --exclude-images, the evaluation sets whose near copies it drops")


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
    from clip_ray.config import ConfigError
    from clip_ray.data.offline.curate import CurateOptions
    from clip_ray.driver.curate import curate_job, resolve_clip_model, scores_pairs
    from clip_ray.inference.models import ModelSourceError

    options = CurateOptions(
        max_per_query=args.max_per_query, balance=args.balance, seed=args.seed, min_words=args.min_words,
        max_words=args.max_words, min_chars=args.min_chars, max_chars=args.max_chars, dedup_images=args.dedup_images,
        validate_images=args.validate_images, max_pixels=args.max_pixels, samples_per_shard=args.samples_per_shard,
        output_format=args.output_format, num_workers=args.num_workers, cpus_per_task=args.cpus_per_task,
        overwrite=args.overwrite, exclude_images=[eval_images_from_spec(spec) for spec in args.exclude_images],
    )
    check_near_duplicate_flags(args)
    clip_score = clip_score_from_args(args)
    if args.queries is None and not scores_pairs(clip_score):
        raise ConfigError("--queries: give a query list, a CLIP-score filter (--clip-model with --min-clip-score "
                          "and/or --clip-top-fraction), or both")

    def resolve():
        if clip_score is None:
            return None
        try:
            return resolve_clip_model(clip_score)
        except ModelSourceError as err:
            raise ModelSourceError(f"{CLIP_SCORE_FLAGS['model']}: {err}") from None

    def job(model) -> dict:
        return curate_job(source_from_args(args), args.queries, args.output, options, clip_score, model,
                          args.near_duplicate_threshold)

    status, _, report = run_on_model("data curate", args, resolve, job)
    if status:
        return status
    print_summary(report, ["pairs_seen", "kept", "dropped", "queries_matched", "duration_s"])
    return 0


def add_queries_command(commands: argparse._SubParsersAction) -> None:
    queries = commands.add_parser("queries", help="build a query list for curate from text: frequent words, "
                                                  "high-PMI bigrams, your own lists")
    add_source_arguments(queries, required=False)  # optional here: a source's captions join the --text corpus
    queries.add_argument("--text", action="append", default=[],
                         help="text file(s), one document or caption per line: path, glob or folder of .txt "
                              "(repeatable)")
    queries.add_argument("--extra-queries", action="append", default=[],
                         help="a list to add: one query per line (titles, synsets) or a JSON list of strings "
                              "(MetaCLIP's metadata.json); normalised as the matcher tokenizes (repeatable)")
    queries.add_argument("--output", required=True, help="queries file, one per line (what curate --queries reads)")
    queries.add_argument("--report", default=None, help="report JSON: queries per rule, corpus totals")
    queries.add_argument("--min-word-count", type=int, default=None,
                         help="keep words occurring this often (default: the paper's >= 100 in ~3B words of "
                              "Wikipedia scaled to the corpus: max(2, round(100 x words / 3e9)))")
    queries.add_argument("--min-bigram-count", type=int, default=None,
                         help="keep bigrams occurring this often (default: the word threshold) ...")
    queries.add_argument("--min-pmi", type=float, default=None,
                         help="... whose PMI ln(p(ab) / (p(a) p(b))) is at least this (default: 3.0)")
    add_ray_arguments(queries)
    queries.set_defaults(run=run_queries)


def run_queries(args: argparse.Namespace) -> int:
    from clip_ray.config import ConfigError
    from clip_ray.data.offline.queries import QueryOptions, queries_job

    if not args.text and args.input is None and not args.extra_queries:
        raise ConfigError("--text: give text files, an INPUT source or --extra-queries lists")
    options = QueryOptions(min_word_count=args.min_word_count, min_bigram_count=args.min_bigram_count)
    options.min_pmi = options.min_pmi if args.min_pmi is None else args.min_pmi
    try:
        options.validate()
    except ValueError as err:
        raise ConfigError(f"data queries: {err}") from None
    source = source_from_args(args) if args.input is not None else None
    return _run_data_job(args, "queries", lambda: queries_job(args.text, source, args.extra_queries, args.output,
                                                              args.report, options), ["queries", "rules", "output"])


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
