"""Which pairs of each partition curation keeps, handed from pass one to pass two through storage.

At 400M pairs the kept set is tens of GB, so it never passes through the
driver: a Ray Data groupby by partition writes each partition's kept positions
(with the meta each kept sample gains) to `<out>/_selection/<partition>.parquet`,
and returns one small row per partition: where the file is, how many pairs it
holds and a digest of its content. The driver keeps only those rows, O(number of
partitions), and pass two's task for a partition reads its own file. The digest
goes into the partition's fingerprint, so a re-run with the same decisions skips
a partition whose shards are written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from clip_ray.storage import AtomicFile, join, resolve

SELECTION_DIR = "_selection"


@dataclass(frozen=True)
class Selection:
    """One partition's kept pairs: a file of (position, meta JSON), or none (`path` None) when it keeps nothing."""

    path: str | None
    digest: str = ""
    count: int = 0

    def fingerprint(self) -> dict:
        return {"digest": self.digest, "count": self.count}

    def read(self) -> dict[int, dict]:
        """{position: meta to add}: what the partition's task writes."""
        if self.path is None:
            return {}
        fs, inner = resolve(self.path)
        with fs.open_input_file(inner) as file:
            table = pq.read_table(file)
        return {position: json.loads(meta)
                for position, meta in zip(table["position"].to_pylist(), table["meta"].to_pylist())}


NOTHING = Selection(path=None)


def _pair_meta(query: int, score: float | None, names: list[str]) -> str:
    meta: dict = {"query": names[query]} if query >= 0 else {}
    if score is not None:
        meta["clip_score"] = score
    return json.dumps(meta, sort_keys=True)


def _write_partition(group: pa.Table, root: str, names: list[str]) -> pa.Table:
    """One partition's kept rows -> its selection file, and the row the driver keeps about it."""
    partition = group["partition"][0].as_py()
    group = group.sort_by("position")
    metas = [_pair_meta(query, score, names) for query, score in
             zip(group["query"].to_pylist(), group["score"].to_pylist())]
    table = pa.table({"position": group["position"], "meta": pa.array(metas, pa.string())})
    digest = hashlib.sha256(json.dumps([table["position"].to_pylist(), metas]).encode()).hexdigest()
    fs, inner = resolve(root)
    path = join(inner, f"{partition:05d}.parquet")
    with AtomicFile(path, fs) as file:
        pq.write_table(table, file.stream)
    return pa.table({"partition": [partition], "path": [join(root, f"{partition:05d}.parquet")],
                     "digest": [digest], "count": [table.num_rows]})


def write_selections(kept: ray.data.Dataset, out_dir: str, names: list[str],
                     num_partitions: int) -> dict[int, Selection]:
    """Writes every partition's kept rows (partition, position, query, score) under `out_dir`; {partition:
    Selection} for the partitions that keep something."""
    root = join(out_dir, SELECTION_DIR)
    fs, inner = resolve(root)
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    fs.create_dir(inner, recursive=True)
    written = (kept.select_columns(["partition", "position", "query", "score"])
               .groupby("partition", num_partitions=num_partitions)
               .map_groups(_write_partition, fn_kwargs={"root": root, "names": names}, batch_format="pyarrow"))
    selections = {}
    for batch in written.iter_batches(batch_format="pyarrow"):
        for row in batch.to_pylist():
            selections[row["partition"]] = Selection(row["path"], row["digest"], row["count"])
    return selections


def remove_selections(out_dir: str) -> None:
    """Pass two has written every partition: the hand-over files are no longer needed."""
    fs, inner = resolve(join(out_dir, SELECTION_DIR))
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)
