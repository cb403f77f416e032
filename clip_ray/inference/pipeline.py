"""The encoding pipeline on Ray Data: partitions in, embedded rows out, each partition whole and in input order.

    from_items(one row per partition)
    -> map_batches(preprocess_partition)   CPU tasks, any node: read, decode, centre-crop, tokenize;
                                           bad samples skipped and counted (PartitionLedger)
    -> map_batches(ClipEncoder)            an actor pool of `concurrency` actors, each with its CPU/GPU share,
                                           each loading the model once

The two stages are kept apart where the cluster has CPUs for both: Ray Data would otherwise fuse
the decode tasks into the actors (their remote args match on a CPU-only run), and a fused actor
task takes `batch_size` partitions and returns their rows only when all are done, so nothing
reaches the driver (and no file is finished) until the end of a small job.

`encode_partitions` runs it and hands each partition back on the driver as soon as all its rows
have arrived (as many as its task reported emitting), sorted by position. `clip-ray embed` writes
each one to a Parquet file; the evaluation suite keeps them in memory. Only embeddings and a few
strings come back to the driver; pixels stay between the two stages in the object store.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator, Protocol

import numpy as np
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import FailureCounts
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.inference.encoder import EMBEDDING_COLUMNS, ClipEncoder
from clip_ray.inference.models import ResolvedModel
from clip_ray.inference.partitions import EmbedPartition, PartitionLedger, preprocess_partition

log = logging.getLogger(__name__)


class EncoderSettings(Protocol):
    """How the pipeline runs (EmbedConfig and the suite's defaults both carry these fields)."""

    batch_size: int  # rows per encoder call and per preprocessed block
    concurrency: int  # encoder actors
    num_gpus_per_actor: float
    num_cpus_per_actor: float
    decode_cpus: float  # CPUs of one read + decode task
    max_pixels: int
    dtype: str  # "float16" | "float32": the embeddings' type
    precision: str  # the encoder's autocast: "auto" | "fp32" | "fp16" | "bf16"


def actor_resources(settings: EncoderSettings) -> dict[str, float]:
    """Ray resources of one encoder actor (or of a task that stands in for one)."""
    resources = {"num_cpus": settings.num_cpus_per_actor}
    if settings.num_gpus_per_actor:
        resources["num_gpus"] = settings.num_gpus_per_actor
    return resources


def decoding_apart(settings: EncoderSettings) -> dict:
    """map_batches arguments that keep the decode tasks out of the encoder actors (see the module docstring).

    Only where the actors leave a decode task its CPUs: where they do not (as many CPU actors as cores),
    apart stages would wait on each other for ever, and fused ones still make progress.
    """
    if settings.num_gpus_per_actor:
        return {}  # the remote args differ: Ray Data does not fuse the stages
    cpus = ray.cluster_resources().get("CPU", 0.0)
    if settings.concurrency * settings.num_cpus_per_actor + settings.decode_cpus <= cpus:
        # Ray Data never fuses an operator that has a ray_remote_args_fn.
        return {"ray_remote_args_fn": functools.partial(dict, num_cpus=settings.decode_cpus)}
    log.warning("%s encoder actor(s) x %s CPU leave no %s CPU for a decode task on this cluster's %s CPUs: Ray Data "
                "decodes inside the actors, and a partition reaches the driver only when its actor task "
                "(%s partitions) is done", settings.concurrency, settings.num_cpus_per_actor, settings.decode_cpus,
                cpus, settings.batch_size)
    return {}


def encoding_dataset(partitions: list[EmbedPartition], model: ResolvedModel, settings: EncoderSettings, *,
                     source: SourceConfig | None, towers: tuple[str, ...], columns: tuple[str, ...],
                     ledger) -> ray.data.Dataset:
    """The Ray Data pipeline over `partitions` (see the module docstring); not started yet."""
    model_config = model.model_config
    preprocessor = Preprocessor(model_config.vision.image_size, model_config.text.context_length, model.tokenizer,
                                train=False, uint8_images=True, max_pixels=settings.max_pixels)
    items = [{"partition": partition.to_json()} for partition in partitions]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        preprocess_partition,
        batch_size=1,  # one partition per call: its rows stream out in blocks of batch_size
        batch_format="numpy",
        num_cpus=settings.decode_cpus,
        fn_kwargs={"source": source, "towers": towers, "columns": columns, "preprocessor": preprocessor,
                   "batch_size": settings.batch_size, "ledger": ledger},
        **decoding_apart(settings),
    )
    return dataset.map_batches(
        ClipEncoder,
        fn_constructor_kwargs={"model": model, "towers": towers, "dtype": settings.dtype,
                               "precision": settings.precision},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=settings.concurrency),
        **actor_resources(settings),
    )


class PartitionAssembler:
    """Rows of unfinished partitions, gathered until each partition has all that its task emitted."""

    def __init__(self, columns: tuple[str, ...], embeddings: tuple[str, ...]):
        self.columns, self.embeddings = columns, embeddings
        self.parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self.positions: dict[int, set[int]] = {}
        self.expected: dict[int, FailureCounts] = {}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        partitions = batch["partition"]
        for index in np.unique(partitions):
            mask = partitions == index
            self.parts.setdefault(int(index), []).append({name: column[mask] for name, column in batch.items()})
            self.positions.setdefault(int(index), set()).update(batch["position"][mask].tolist())

    def expect(self, reports: dict[int, dict]) -> None:
        self.expected.update({int(index): FailureCounts.from_dict(counts) for index, counts in reports.items()})

    def pending_rows(self) -> int:
        return sum(len(positions) for positions in self.positions.values())

    def complete(self) -> list[int]:
        return [index for index, counts in self.expected.items()
                if len(self.positions.get(index, ())) == counts.ok]

    def pop(self, index: int) -> tuple[dict, FailureCounts]:
        """The partition's columns in input order (a retried task's repeated rows dropped), and its counts."""
        parts = self.parts.pop(index, [])
        self.positions.pop(index, None)
        counts = self.expected.pop(index)
        columns = {name: np.concatenate([p[name] for p in parts]) if parts else np.empty(0)
                   for name in ("position", *self.columns, *self.embeddings)}
        _, first = np.unique(columns["position"], return_index=True)  # sorted by position, one row each
        return {name: column[first] for name, column in columns.items()}, counts


def stacked(column: np.ndarray, dim: int) -> np.ndarray:
    """An embedding column as one [N, dim] array (Ray Data may hand tensor columns back as arrays of rows)."""
    if column.dtype == object:
        column = np.stack(column) if len(column) else np.empty((0, dim))
    return column.reshape(-1, dim)


def encode_partitions(partitions: list[EmbedPartition], model: ResolvedModel, settings: EncoderSettings, *,
                      source: SourceConfig | None, towers: tuple[str, ...], columns: tuple[str, ...],
                      tick: Callable[[int], None] | None = None
                      ) -> Iterator[tuple[int, dict[str, np.ndarray], FailureCounts]]:
    """(index, columns in input order, counts) of each partition as soon as it is whole, in completion order.

    `columns` are the row fields passed on (clip_ray.inference.partitions.Row); the embeddings come as
    "image_embedding" / "text_embedding" in `settings.dtype`, with "partition" and "position". `tick` is
    called after every batch with the number of rows waiting for their partition to complete. Raises
    RuntimeError when a partition did not come back whole.
    """
    if not partitions:
        return
    ledger = PartitionLedger.remote()
    assembler = PartitionAssembler(columns, tuple(EMBEDDING_COLUMNS[tower] for tower in towers))
    done: set[int] = set()

    def complete():
        for index in assembler.complete():
            done.add(index)
            yield (index, *assembler.pop(index))

    dataset = encoding_dataset(partitions, model, settings, source=source, towers=towers, columns=columns,
                               ledger=ledger)
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        assembler.add(batch)
        assembler.expect(ray.get(ledger.take.remote()))
        yield from complete()
        if tick is not None:
            tick(assembler.pending_rows())
    assembler.expect(ray.get(ledger.take.remote()))
    yield from complete()
    missing = sorted(p.index for p in partitions if p.index not in done)
    if missing:
        raise RuntimeError(f"partitions {missing[:10]} did not come back whole from the pipeline "
                           f"({len(missing)} in all); run the job again to redo them")
