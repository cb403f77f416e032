"""Embedding files: Parquet with a key, what the row is, and fixed-size embedding vectors.

One file per input partition, `part-NNNNN.parquet`, written whole or not at all (a temporary
name, then a rename). Columns, in this order:

    key               string   the sample's key in its source
    caption, url      string   image-text pairs: the caption, and the URL when the source has one (img2dataset)
    label             string   an ImageFolder: the class folder
    source            string   where the image is: its shard, or its own file
    image_embedding   fixed_size_list<float16 | float32>[embed_dim]   unit vectors
    text_embedding    fixed_size_list<float16 | float32>[embed_dim]   unit vectors

The file's schema metadata holds one JSON document under `clip_ray.embeddings`: the format,
the model's identity (clip_ray.inference.models.ResolvedModel.identity: source, exact location,
step or MLflow model id, config digest, embed_dim, tokenizer digest), dtype, normalized=true,
the preprocessing, the partition (index and input), its failure counts and the fingerprint a
re-run compares to decide whether the file is already done. `pq.read_schema` reads it from the
footer alone.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from clip_ray.storage import AtomicFile, basename, join, list_shards, resolve

FORMAT = "clip-ray-embeddings/1"
METADATA_KEY = b"clip_ray.embeddings"
PART_NAME = re.compile(r"^part-(\d{5,})\.parquet$")
STATS_FILE = "embed_stats.json"
PAIR_COLUMNS = ("key", "caption", "url", "source")
FOLDER_COLUMNS = ("key", "label", "source")
ARROW_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
# Rows per Parquet row group: search reads a group at a time.
ROWS_PER_GROUP = 8192


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def embedding_schema(text_columns: Sequence[str], embedding_columns: Sequence[str], dim: int, dtype: str,
                     metadata: dict | None = None) -> pa.Schema:
    vector = pa.list_(ARROW_DTYPES[dtype], dim)
    fields = [pa.field(name, pa.string()) for name in text_columns]
    fields += [pa.field(name, vector, nullable=False) for name in embedding_columns]
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def vectors_to_arrow(matrix: np.ndarray, dtype: str | np.dtype) -> pa.FixedSizeListArray:
    """[N, D] -> a fixed-size list array of D values per row, in `dtype`."""
    matrix = np.ascontiguousarray(matrix, dtype=np.dtype(dtype))
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def arrow_to_vectors(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size list column -> [N, D] numpy, in the stored type (no copy for a single chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    if column.null_count:
        raise ValueError("embedding column with nulls: not written by clip-ray embed")
    values = column.flatten()  # this array's rows only, whatever its offset
    if values.null_count:
        raise ValueError("embedding column with null values: not written by clip-ray embed")
    # Straight from the data buffer: pyarrow's own to_numpy converts half floats one by one (~100x slower).
    dtype = np.dtype(values.type.to_pandas_dtype())
    matrix = np.frombuffer(values.buffers()[1], dtype=dtype, count=len(values), offset=values.offset * dtype.itemsize)
    return matrix.reshape(-1, dim)


def write_embedding_file(path: str, schema: pa.Schema, columns: dict[str, Any]) -> int:
    """Writes one table (strings as lists, embeddings as [N, D] arrays) atomically; returns its rows."""
    arrays = []
    for field in schema:
        value = columns[field.name]
        if pa.types.is_fixed_size_list(field.type):
            matrix = np.asarray(value).reshape(-1, field.type.list_size)
            arrays.append(vectors_to_arrow(matrix, np.dtype(field.type.value_type.to_pandas_dtype())))
        else:
            arrays.append(pa.array(list(value), type=field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    fs, inner = resolve(path)
    # Dictionaries for the strings only: trying one on float vectors halves the write speed and the read speed.
    strings = [field.name for field in schema if pa.types.is_string(field.type)]
    with AtomicFile(inner, fs) as file:
        pq.write_table(table, file.stream, row_group_size=ROWS_PER_GROUP, use_dictionary=strings)
    return table.num_rows


def read_footer(path: str, filesystem: pafs.FileSystem | None = None) -> tuple[dict | None, int]:
    """(the clip-ray metadata of an embedding file or None, its row count), from the footer alone;
    (None, 0) for a file that cannot be read as Parquet."""
    try:
        fs, inner = resolve(path, filesystem)
        with fs.open_input_file(inner) as file:
            footer = pq.read_metadata(file)
    except (OSError, pa.ArrowException):
        return None, 0
    raw = (footer.metadata or {}).get(METADATA_KEY)
    try:
        return (json.loads(raw) if raw is not None else None), footer.num_rows
    except ValueError:
        return None, footer.num_rows


def read_metadata(path: str, filesystem: pafs.FileSystem | None = None) -> dict | None:
    """The clip-ray metadata of an embedding file, or None when it has none or cannot be read."""
    return read_footer(path, filesystem)[0]


def list_embedding_files(paths: str | Sequence[str]) -> list[str]:
    """Parquet files named by a file, a folder (its .parquet files, recursively) or a glob, in order."""
    return [path for path in list_shards(paths, (".parquet",)) if path.endswith(".parquet")]


def clean_output_folder(out_dir: str, keep: set[str] | None) -> int:
    """Deletes leftover temporary files of part files, and part files whose names are not in `keep`
    (with `keep` given); other files are left alone. Returns how many it removed."""
    fs, root = resolve(out_dir)
    removed = 0
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        name = basename(info.path)
        temporary = name.endswith(".tmp") and PART_NAME.match(name[: -len(".tmp")])
        stale = keep is not None and PART_NAME.match(name) and name not in keep
        if info.is_file and (temporary or stale):
            fs.delete_file(info.path)
            removed += 1
    return removed


def iter_vectors(path: str, column: str, filesystem: pafs.FileSystem | None = None) -> Iterator[np.ndarray]:
    """The [n, D] vectors of `column`, one row group at a time."""
    fs, inner = resolve(path, filesystem)
    with fs.open_input_file(inner) as file:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            yield arrow_to_vectors(parquet.read_row_group(group, columns=[column]).column(0))


def read_rows(path: str, rows: Sequence[int], columns: Sequence[str]) -> list[dict]:
    """The given rows (numbers within the file) of `columns`, as dicts in the order asked."""
    fs, inner = resolve(path)
    with fs.open_input_file(inner) as file:
        table = pq.read_table(file, columns=list(columns))
    picked = table.take(pa.array(list(rows), type=pa.int64()))
    return picked.to_pylist()


def output_path(out_dir: str, index: int) -> str:
    return join(out_dir, part_name(index))
