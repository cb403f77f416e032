"""Nearest neighbours over embedding files (`clip-ray search`).

    files = EmbeddingSet.open("embeddings/")            # a file, a folder or a glob
    model = query_model(files)                           # the model the files record, checked against them
    queries = embed_queries(model, texts=["a red circle"])
    hits = search(files, queries, k=10)                  # per query: Hit(rank, score, key, caption, ...)

Exact search streams the files' vectors in chunks of `chunk_rows` rows and keeps a running
top-k per query: scores are one matrix product per chunk (queries x chunk), on the GPU when
there is one, so memory stays bounded by the chunk whatever the number of rows. The vectors are
unit-norm, so the score is the cosine similarity.

Approximate search (`approximate=True`) builds an HNSW graph with FAISS, which the project does
not depend on: it is used when `faiss` is importable (pip install faiss-cpu) and refused with
that advice otherwise. The index can be saved beside the files and is rebuilt when the files
change. For a few million rows the exact search is already fast; an index pays off when the
same large set answers many queries.

A query must be embedded by the model the files were made with: `query_model` takes it from
the files' metadata (the exact checkpoint or MLflow model and the tokenizer) or checks a given
one against it (same architecture digest and tokenizer digest).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from clip_ray.data.formats import BadSample, Sample
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.inference.embedding_files import (
    FORMAT, iter_vectors, list_embedding_files, read_footer, read_rows,
)
from clip_ray.inference.encoder import EMBEDDING_COLUMNS, ClipEncoder
from clip_ray.inference.models import ResolvedModel, resolve_model
from clip_ray.storage import resolve

log = logging.getLogger("clip_ray.search")

DEFAULT_CHUNK_ROWS = 65_536
# Text queries per encoder call.
QUERY_BATCH = 1024
# What must agree between files for their rows to be one searchable set.
_SAME_ACROSS_FILES = ("format", "towers", "dtype", "embed_dim", "normalized")
_SAME_MODEL = ("config_sha256", "location", "version")


class SearchError(ValueError):
    """Embedding files that cannot be searched as asked; the message says why and names a file."""


@dataclass
class Hit:
    rank: int
    score: float
    key: str
    caption: str | None
    url: str | None
    label: str | None
    source: str | None
    file: str
    row: int


class EmbeddingSet:
    """The embedding files under one or more paths, checked to be one set from one model."""

    def __init__(self, files: list[str], metadata: list[dict], rows: list[int]):
        self.files, self.metadata, self.rows = files, metadata, rows
        self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)

    @classmethod
    def open(cls, paths: str | Sequence[str]) -> "EmbeddingSet":
        files = list_embedding_files(paths)
        if not files:
            raise SearchError(f"no .parquet files at {paths}")
        metadata, rows = [], []
        for path in files:
            meta, num_rows = read_footer(path)
            if meta is None or meta.get("format") != FORMAT:
                raise SearchError(f"{path}: not an embedding file written by clip-ray embed")
            metadata.append(meta)
            rows.append(num_rows)
        first = metadata[0]
        for path, meta in zip(files[1:], metadata[1:]):
            for name in _SAME_ACROSS_FILES:
                if meta.get(name) != first.get(name):
                    raise SearchError(f"{path} and {files[0]} differ in {name} ({meta.get(name)!r} vs "
                                      f"{first.get(name)!r}): search them apart")
            for name in _SAME_MODEL:
                if meta["model"].get(name) != first["model"].get(name):
                    raise SearchError(f"{path} and {files[0]} come from different models (model {name}: "
                                      f"{meta['model'].get(name)!r} vs {first['model'].get(name)!r}); their "
                                      "scores do not compare: search them apart")
        return cls(files, metadata, rows)

    @property
    def model(self) -> dict:
        return self.metadata[0]["model"]

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.metadata[0]["embed_dim"])

    def column(self, against: str | None = None) -> str:
        """The embedding column to search: `against`'s tower ("image" or "text"), by default image."""
        towers = self.metadata[0]["towers"]
        tower = against or ("image" if "image" in towers else towers[0])
        if tower not in towers:
            raise SearchError(f"{self.files[0]}: has no {EMBEDDING_COLUMNS.get(tower, tower)} (towers: {towers})")
        return EMBEDDING_COLUMNS[tower]

    def chunks(self, column: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first global row, [n, D] vectors) over every file in order, n about `chunk_rows` (whole row groups)."""
        pending: list[np.ndarray] = []
        start = held = 0
        for offset, path in zip(self.offsets, self.files):
            if not held:
                start = int(offset)
            for vectors in iter_vectors(path, column):
                pending.append(vectors)
                held += len(vectors)
                if held >= chunk_rows:
                    yield start, np.concatenate(pending)
                    start, pending, held = start + held, [], 0
        if held:
            yield start, np.concatenate(pending)

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        """Each query's top rows (scores and global row numbers [Q, k], best first; -1 for none) as Hits
        with their strings; each file holding any of them is read once for all the queries."""
        wanted = np.unique(np.asarray(rows)[np.asarray(rows) >= 0])
        owners = np.searchsorted(self.offsets, wanted, side="right") - 1
        found: dict[int, dict] = {}
        for file_index in np.unique(owners):
            path, first = self.files[file_index], int(self.offsets[file_index])
            file_rows = wanted[owners == file_index].tolist()
            values = read_rows(path, [row - first for row in file_rows], _text_columns(path))
            found.update({row: {**value, "file": path, "row": row - first} for row, value in zip(file_rows, values)})
        results = []
        for query_scores, query_rows in zip(scores, rows):
            ranked = [(found[int(row)], float(score)) for row, score in zip(query_rows, query_scores) if row >= 0]
            results.append([Hit(rank=rank, score=score, key=row.get("key"), caption=row.get("caption"),
                                url=row.get("url"), label=row.get("label"), source=row.get("source"),
                                file=row["file"], row=row["row"])
                            for rank, (row, score) in enumerate(ranked, start=1)])
        return results

    def group_ids(self, column: str) -> np.ndarray:
        """[num_rows] int64: rows with the same value of the string `column` share a number; a null is its own."""
        numbers: dict[object, int] = {}
        ids = np.empty(self.num_rows, dtype=np.int64)
        for offset, path in zip(self.offsets, self.files):
            names = _text_columns(path)
            if column not in names:
                raise SearchError(f"{path}: no string column {column!r} to tell items apart by (it has {names})")
            for row, value in enumerate(_string_column(path, column), start=int(offset)):
                ids[row] = numbers.setdefault(value if value is not None else (None, row), len(numbers))
        return ids


def _text_columns(path: str) -> list[str]:
    """The string columns of an embedding file (key, caption, url or label, source)."""
    fs, inner = resolve(path)
    with fs.open_input_file(inner) as file:
        schema = pq.read_schema(file)
    return [field.name for field in schema if pa.types.is_string(field.type)]


def _string_column(path: str, column: str) -> list[str | None]:
    fs, inner = resolve(path)
    with fs.open_input_file(inner) as file:
        return pq.read_table(file, columns=[column]).column(0).to_pylist()


# --------------------------------------------------------------------------- top-k


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def exact_top_k(queries: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]], k: int,
                device: torch.device | str | None = None, groups: np.ndarray | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], global rows [Q, k]) of the k largest dot products per query, best first.

    One matrix product per chunk, then the chunk's top k merged with the best so far: memory
    is the chunk plus Q x 2k. Fewer than k rows in all: the missing places hold -inf and -1.
    `groups` ([num_rows] ints, e.g. EmbeddingSet.group_ids): rows of one group are one item, its
    best-scoring row stands for it, and the k places go to k different groups.
    """
    device = torch.device(device) if device is not None else default_device()
    q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    best_scores = torch.full((len(q), k), -torch.inf, device=device)
    best_rows = torch.full((len(q), k), -1, dtype=torch.long, device=device)
    best_groups = torch.full((len(q), k), -1, dtype=torch.long, device=device)
    for start, matrix in chunks:
        vectors = torch.from_numpy(np.ascontiguousarray(matrix)).to(device).float()  # float16 travels as is
        scores = q @ vectors.T
        if groups is None:
            chunk_scores, chunk_rows = scores.topk(min(k, scores.shape[1]), dim=1)
            chunk_groups = chunk_rows + start  # every row its own item
        else:
            chunk_scores, chunk_rows, chunk_groups = _top_groups(scores, groups[start:start + scores.shape[1]], k)
        merged_scores = torch.cat([best_scores, chunk_scores], dim=1)
        merged_groups = torch.cat([best_groups, chunk_groups], dim=1)
        if groups is not None:  # an item may have stood in an earlier chunk too
            merged_scores = _drop_repeated_groups(merged_scores, merged_groups)
        merged_rows = torch.cat([best_rows, chunk_rows + start], dim=1)
        best_scores, order = merged_scores.topk(k, dim=1)
        best_rows, best_groups = merged_rows.gather(1, order), merged_groups.gather(1, order)
    best_rows = best_rows.masked_fill(torch.isneginf(best_scores), -1)  # places no row (or a dropped one) fills
    return best_scores.cpu().numpy(), best_rows.cpu().numpy()


def _top_groups(scores: torch.Tensor, row_groups: np.ndarray, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, rows in the chunk, group ids), each [Q, min(k, groups)], of each query's best groups in a chunk;
    a group is scored by its best row (the first of equals)."""
    ids, local = np.unique(row_groups, return_inverse=True)
    local = torch.from_numpy(local.reshape(-1)).to(scores.device).expand_as(scores)
    group_scores = torch.full((len(scores), len(ids)), -torch.inf, device=scores.device)
    group_scores = group_scores.scatter_reduce(1, local, scores, reduce="amax")
    past_end = scores.shape[1]  # int32 row numbers: a chunk's rows fit, and they halve this step's memory
    row_numbers = torch.arange(past_end, dtype=torch.int32, device=scores.device).expand_as(scores)
    best_rows = row_numbers.masked_fill(scores != group_scores.gather(1, local), past_end)
    first_best = torch.full(group_scores.shape, past_end, dtype=torch.int32, device=scores.device).scatter_reduce(
        1, local, best_rows, reduce="amin")
    top_scores, top = group_scores.topk(min(k, len(ids)), dim=1)
    return top_scores, first_best.gather(1, top).long(), torch.from_numpy(ids).to(scores.device)[top]


def _drop_repeated_groups(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """`scores` [Q, M] with -inf wherever the same group stands at a better place (higher, or equal and earlier)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    by_group, regroup = groups.gather(1, order).sort(dim=1, stable=True)  # a group's places together, best first
    repeated = torch.zeros_like(by_group, dtype=torch.bool)
    repeated[:, 1:] = by_group[:, 1:] == by_group[:, :-1]
    in_score_order = torch.empty_like(repeated).scatter_(1, regroup, repeated)
    return scores.masked_fill(torch.empty_like(repeated).scatter_(1, order, in_score_order), -torch.inf)


def _faiss():
    try:
        import faiss
    except ImportError:
        raise SearchError("approximate search needs FAISS, which clip-ray does not install: "
                          "pip install faiss-cpu (or faiss-gpu), or search exactly") from None
    return faiss


def approximate_top_k(files: EmbeddingSet, column: str, queries: np.ndarray, k: int,
                      index_path: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Like exact_top_k through a FAISS HNSW index (inner product) of the whole set; with
    `index_path` (a local file) the index is saved there and reused while the files are the same."""
    faiss = _faiss()
    signature = {"files": files.files, "rows": files.rows, "column": column,
                 "fingerprints": [meta.get("fingerprint") for meta in files.metadata]}
    index = None
    if index_path and Path(index_path).is_file() and Path(index_path + ".json").is_file():
        if json.loads(Path(index_path + ".json").read_text()) == signature:
            index = faiss.read_index(index_path)
            log.info("reusing the FAISS index %s", index_path)
    if index is None:
        index = faiss.IndexHNSWFlat(files.dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        for _, vectors in files.chunks(column, chunk_rows):
            index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        log.info("built a FAISS HNSW index of %d rows", index.ntotal)
        if index_path:
            faiss.write_index(index, index_path)
            Path(index_path + ".json").write_text(json.dumps(signature))
    index.hnsw.efSearch = max(64, 2 * k)
    scores, rows = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, rows


def search(files: EmbeddingSet, queries: np.ndarray, k: int = 10, against: str | None = None,
           device: torch.device | str | None = None, approximate: bool = False, index_path: str | None = None,
           chunk_rows: int = DEFAULT_CHUNK_ROWS, distinct: str | None = None) -> list[list[Hit]]:
    """The k nearest rows of `against`'s embeddings (default image) for each query vector, best first.

    `distinct`: a string column whose equal values are one item, e.g. "source" for the images of a
    caption table (a photo with five captions has five rows): each item's best row only, k items."""
    queries = np.asarray(queries, dtype=np.float32).reshape(-1, files.dim)
    column = files.column(against)
    if approximate:
        if distinct is not None:
            raise SearchError("distinct items need the exact search (the FAISS index knows rows, not items)")
        scores, rows = approximate_top_k(files, column, queries, k, index_path, chunk_rows)
    else:
        groups = files.group_ids(distinct) if distinct is not None else None
        scores, rows = exact_top_k(queries, files.chunks(column, chunk_rows), k, device, groups)
    return files.hits(scores, rows)


# --------------------------------------------------------------------------- queries


def query_model(files: EmbeddingSet, model: str | None = None, tokenizer: str | None = None,
                tracking_uri: str | None = None) -> ResolvedModel:
    """The model that embeds queries for `files`: `model` (checked against the files) or the one they
    record; SearchError when its architecture or tokenizer differs from theirs."""
    recorded = files.model
    if model is None:
        model = recorded["location"]
        tokenizer = tokenizer or recorded["tokenizer"].get("given")
        tracking_uri = tracking_uri or recorded.get("tracking_uri")
    resolved = resolve_model(model, tokenizer, tracking_uri, recorded.get("state_dict_options", {}).get(
        "activation", "quick_gelu"))
    mine = resolved.identity()
    if mine["config_sha256"] != recorded["config_sha256"]:
        raise SearchError(f"{model} is not the architecture of the files' model {recorded['location']}: "
                          "its query embeddings would not compare")
    if mine["tokenizer"]["sha256"] != recorded["tokenizer"]["sha256"]:
        raise SearchError(f"tokenizer {mine['tokenizer']['path']} is not the one the files were made with "
                          f"({recorded['tokenizer']['path']}); pass --tokenizer with that one")
    if (mine["location"], mine["version"]) != (recorded["location"], recorded["version"]):
        log.warning("querying with %s (%s); the files were made with %s (%s)", mine["location"], mine["version"],
                    recorded["location"], recorded["version"])
    return resolved


def read_image_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def embed_queries(model: ResolvedModel, texts: Sequence[str] = (), images: Sequence[str] = (),
                  device: str | None = None, encoder: ClipEncoder | None = None,
                  batch_size: int = QUERY_BATCH) -> np.ndarray:
    """[len(texts) + len(images), D] float32 unit vectors: the texts through the text tower (`batch_size`
    at a time), then the image files (local or URIs) through the image tower, preprocessed as the
    embedding job does. `encoder`: one already holding `model` (loading it again costs time for every call)."""
    encoder = encoder or ClipEncoder(model, dtype="float32", device=device)
    config = model.model_config
    parts = []
    for start in range(0, len(texts), batch_size):
        tokens = model.tokenizer(list(texts[start:start + batch_size]), context_length=config.text.context_length)
        parts.append(encoder.encode_texts(tokens))
    if images:
        preprocessor = Preprocessor(config.vision.image_size, config.text.context_length, tokenize=None,
                                    train=False)
        pixels = []
        for path in images:
            try:
                pixels.append(preprocessor.image(Sample(key=path, image=read_image_bytes(path), caption="")))
            except BadSample as bad:
                raise SearchError(f"query image {path}: {bad}") from None
        parts.append(encoder.encode_images(np.stack(pixels).transpose(0, 3, 1, 2)))
    if not parts:
        raise SearchError("nothing to search for: give a text or an image")
    return np.concatenate(parts).astype(np.float32)
