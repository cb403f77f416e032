"""`clip-ray embed` (a data set -> Parquet files of embeddings, on Ray) and `clip-ray search` (nearest neighbours)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from clip_ray.cli.common import (
    SOURCE_FORMATS, add_ray_arguments, add_source_arguments, add_tokenizer_arguments, print_summary, run_on_model,
    source_from_args,
)
from clip_ray.config import EmbedConfig
from clip_ray.data.formats.samples import DEFAULT_MAX_PIXELS

MODEL_HELP = ("a checkpoint directory, a run directory (its latest checkpoint), a model.pt or OpenAI-layout state "
              "dict file, an MLflow model (runs:/ID/model, models:/NAME/VERSION, models:/ID) or run (runs:/ID)")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", required=required, default=None,
                       help=MODEL_HELP + ("" if required else " (default: the model the files record)"))
    add_tokenizer_arguments(model)
    model.add_argument("--tracking-uri", default=None, help="MLflow server of an MLflow model "
                                                            "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")


def add_embed_commands(groups: argparse._SubParsersAction) -> None:
    embed = groups.add_parser(
        "embed", help="embed a data set with a trained model: Parquet files of normalised embeddings",
        description="Ray Data batch inference: read and decode on CPU tasks, encode on an actor pool (each "
                    "actor loads the model once), one Parquet file per input partition. Running it again skips "
                    "the partitions already written.")
    add_source_arguments(embed, (*SOURCE_FORMATS, "imagefolder"))
    embed.add_argument("output", help="folder (or URI) for part-NNNNN.parquet and embed_stats.json")
    add_model_arguments(embed, required=True)
    what = embed.add_argument_group("output")
    what.add_argument("--embed", choices=["both", "image", "text"], default="both",
                      help="towers to run (default: %(default)s; an imagefolder has images only)")
    what.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored vector type")
    what.add_argument("--samples-per-partition", type=int, default=10_000,
                      help="rows per output file for csv/coco/imagefolder inputs (a shard is always one file)")
    what.add_argument("--overwrite", action="store_true", help="redo partitions a previous run finished")
    what.add_argument("--max-failure-fraction", type=float, default=1.0,
                      help="exit with an error when more of the input is bad (default: only if all is)")
    what.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are skipped")
    actors = embed.add_argument_group("actors")
    actors.add_argument("--concurrency", type=int, default=1, help="encoder actors (default: %(default)s)")
    actors.add_argument("--num-gpus-per-actor", type=float, default=0.0,
                        help="GPU share of an actor, e.g. 0.25 puts four on a GPU (default: CPU only)")
    actors.add_argument("--num-cpus-per-actor", type=float, default=1.0)
    actors.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs of one read + decode task")
    actors.add_argument("--batch-size", type=int, default=256, help="rows per encoder call")
    actors.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                        help="encoder autocast (auto: fp16 on a GPU, fp32 on a CPU)")
    actors.add_argument("--progress-every-s", type=float, default=30.0, help="seconds between progress lines")
    add_ray_arguments(embed)
    embed.set_defaults(run=run_embed)


def embed_config_from_args(args: argparse.Namespace) -> EmbedConfig:
    folder = args.input_format == "imagefolder"
    return EmbedConfig(
        output=args.output, model=args.model, source=None if folder else source_from_args(args),
        image_folder=args.input if folder else None, tokenizer=args.tokenizer, tracking_uri=args.tracking_uri,
        embed=args.embed, dtype=args.dtype, precision=args.precision, batch_size=args.batch_size,
        concurrency=args.concurrency, num_gpus_per_actor=args.num_gpus_per_actor,
        num_cpus_per_actor=args.num_cpus_per_actor, decode_cpus=args.decode_cpus,
        samples_per_partition=args.samples_per_partition, max_pixels=args.max_pixels, overwrite=args.overwrite,
        max_failure_fraction=args.max_failure_fraction, progress_every_s=args.progress_every_s,
        state_dict_activation=args.state_dict_activation)


def run_embed(args: argparse.Namespace) -> int:
    from clip_ray.driver.embed import embed
    from clip_ray.inference.models import resolve_model

    config = embed_config_from_args(args)
    config.validate()
    status, _, summary = run_on_model(
        "embed", args, lambda: resolve_model(config.model, config.tokenizer, config.tracking_uri,
                                             config.state_dict_activation),
        lambda model: embed(config, model))
    if status:
        return status
    print_summary(summary, ["rows_written", "rows_embedded_now", "partitions", "partitions_written",
                            "partitions_reused", "failures", "duration_s", "rows_per_s", "output"])
    return 0


# --------------------------------------------------------------------------- clip-ray search


def add_search_commands(groups: argparse._SubParsersAction) -> None:
    search = groups.add_parser(
        "search", help="nearest neighbours of a text or an image in embedding files",
        description="Exact top-k by matrix products over the files' vectors, read in chunks (on a GPU when "
                    "there is one); --approximate uses a FAISS HNSW index when faiss is installed. A query is "
                    "embedded by the model the files record, unless --model names another with the same "
                    "architecture and tokenizer.")
    search.add_argument("embeddings", nargs="+", help="embedding files: a file, a folder or a glob (several allowed)")
    query = search.add_argument_group("query")
    query.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    query.add_argument("--image", action="append", default=[], help="an image file as the query (repeatable)")
    query.add_argument("-k", "--top-k", type=int, default=10, help="neighbours per query (default: %(default)s)")
    query.add_argument("--against", choices=["image", "text"], default=None,
                       help="which embeddings to search (default: image_embedding when the files have it)")
    add_model_arguments(search, required=False)
    how = search.add_argument_group("search")
    how.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    how.add_argument("--chunk-rows", type=int, default=65_536, help="rows per matrix product (bounds memory)")
    how.add_argument("--approximate", action="store_true", help="a FAISS HNSW index (pip install faiss-cpu)")
    how.add_argument("--distinct", default=None, metavar="COLUMN",
                     help="rows with the same value of this string column are one hit, e.g. source: a photo "
                          "stored once per caption comes back once (exact search only)")
    how.add_argument("--index", dest="index_path", default=None,
                     help="with --approximate: save the index here and reuse it while the files are the same")
    how.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.set_defaults(run=run_search)


def _cell(value, width: int) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def format_hits(query: str, hits) -> str:
    """A table of one query's hits: rank, score, key, caption (or label), URL when any has one."""
    lines = [query]
    with_url = any(hit.url for hit in hits)
    header = f"{'rank':>4}  {'score':>7}  {'key':<24}  {'caption':<60}" + ("  url" if with_url else "")
    lines.append(header)
    for hit in hits:
        text = hit.caption if hit.caption is not None else hit.label
        line = f"{hit.rank:>4}  {hit.score:>7.4f}  {_cell(hit.key, 24):<24}  {_cell(text, 60):<60}"
        lines.append(line + (f"  {hit.url or ''}" if with_url else ""))
    return "\n".join(line.rstrip() for line in lines)


def run_search(args: argparse.Namespace) -> int:
    from clip_ray.inference.models import ModelSourceError
    from clip_ray.inference.search import EmbeddingSet, SearchError, embed_queries, query_model, search

    if not args.text and not args.image:
        print("clip-ray search: give --text or --image", file=sys.stderr)
        return 2
    try:
        files = EmbeddingSet.open(args.embeddings)
        model = query_model(files, args.model, args.tokenizer, args.tracking_uri)
        queries = embed_queries(model, args.text, args.image, device=args.device)
        results = search(files, queries, k=args.top_k, against=args.against, device=args.device,
                         approximate=args.approximate, index_path=args.index_path, chunk_rows=args.chunk_rows,
                         distinct=args.distinct)
    except (SearchError, ModelSourceError) as err:
        print(f"clip-ray search: {err}", file=sys.stderr)
        return 2
    labels = [f"text {text!r}" for text in args.text] + [f"image {path}" for path in args.image]
    if args.json:
        print(json.dumps([{"query": label, "hits": [dataclasses.asdict(hit) for hit in hits]}
                          for label, hits in zip(labels, results)], indent=2))
        return 0
    column = files.column(args.against)
    how = "approximate (FAISS HNSW)" if args.approximate else "exact"
    print(f"{files.num_rows} rows in {len(files.files)} file(s), {column}, {how}")
    for label, hits in zip(labels, results):
        print()
        print(format_hits(label, hits))
    return 0
