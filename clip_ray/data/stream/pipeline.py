"""The Ray Data stream that feeds training workers image-text rows of fixed shape.

One epoch, end to end:

    rank 0: each source -> units (its shards; or slices of a caption table)
            -> plan_train_epoch(seed, epoch): the epoch's units, in a seeded order
    worker r: rank_units(plan, r, n): its share of the units
      ray.data.from_items(one row per unit)                     nothing is materialised:
      -> map_batches(_preprocess_units), CPU tasks, any node:   rows stream through the
           read the unit (any pyarrow URI)                      object store and are gone
           -> shuffle it in a buffer of `shuffle_buffer` encoded samples, number them (ordinals)
           -> drop the ordinals a resume has consumed, before decoding them
           -> decode + crop + normalise + tokenize, `preprocess_batch_size` rows at a time
           -> report the unit's FailureCounts to the FailureTracker actor
      -> batches.TrainBatches: windows of ~`shuffle_buffer` rows, each permuted -> batches -> torch

Shares. Worker r takes units r, r + n, r + 2n, ... of the first n * floor(U / n)
units of the plan; each of the last U mod n units is shared by all workers,
worker r taking every n-th of its samples from the r-th on (with fewer units than
workers, every unit is shared so). Every usable sample of the epoch is in exactly
one worker's share. Every worker gets the same number of whole units, so shares
differ only as much as the units' sizes do (equal-sized shards: by a row per shared
unit). Each worker has its own dataset, so a resumed worker can start its own stream
from its own place; there is no split coordinator, and no worker waits for another's
reads.

What is guaranteed, per epoch, for per-worker batch B:

- Coverage: every sample is seen at most once. The workers take the same number
  of steps: the epoch ends when the shortest share has no full batch left (the
  training loop agrees on it, see worker.epoch_data), so what is dropped is the
  difference between shares plus less than a batch per worker.
- Order: a pure function of (config, epoch, n, rank), and not of where the data
  lives: units are planned and shuffled by their source's position in the config
  and their path within the source (`unit_key`); datasets run with
  `preserve_order`, and the crop of a sample is seeded by the sample itself.
- Resume: a row carries its unit's plan index and its ordinal; a StreamPosition
  (batches module) names the last row before the current shuffle window, and the
  stream rebuilt `after` it reads no unit before that row's unit and decodes none
  of that unit's earlier ordinals. At most one window is decoded again.
- Failures: bad samples are skipped and counted by reason inside the tasks; each
  unit's counts go to a FailureTracker actor (keyed by unit and slice, so a retried
  task overwrites rather than adds) before the unit's last rows are emitted. When a
  worker's iterator ends, every unit of its share has reported:
  `tracker.check(stream, ...)` then raises DataError naming a source that failed
  too often or gave nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import random
from typing import Iterable, Iterator, Sequence

import numpy as np
import ray

from clip_ray.config import DataConfig, SourceConfig
from clip_ray.data.formats import DataError, FailureCounts, FailureReason, Sample, list_shards, read_shard
from clip_ray.data.formats.folders import load_caption_csv, load_coco_captions, load_split, samples_from_table
from clip_ray.data.stream.failure_tracker import FailureTracker, train_stream
from clip_ray.data.stream.mixing import MixSource, plan_mixture
from clip_ray.data.stream.preprocess import Preprocessor
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.storage import basename, is_uri, under

# Photos per unit of a caption-table source (with ~5 captions each): enough rows to
# keep a task busy for a second or so, small enough to spread over many cores.
TABLE_IMAGES_PER_UNIT = 256
# The files a directory given as a shard source is searched for.
_SHARD_EXTENSIONS = {"webdataset": (".tar",), "parquet": (".parquet",)}


# --------------------------------------------------------------------------- sources -> units


def _source_names(sources: Sequence[SourceConfig]) -> list[str]:
    """A source is named by its path (what an error message should show); repeats get '#i'."""
    names = []
    for i, source in enumerate(sources):
        names.append(source.path if source.path not in names else f"{source.path}#{i}")
    return names


def _table_units(source: SourceConfig, name: str) -> list[tuple[str, str]]:
    """(unit id, JSON slice of the caption table) per TABLE_IMAGES_PER_UNIT photos of a csv/coco source."""
    try:
        if source.format == "csv":
            table = load_caption_csv(under(source.path, source.captions_file), None,
                                     source.image_column, source.caption_column)
            problems = []
        else:
            table, problems = load_coco_captions(under(source.path, source.captions_file))
        names = load_split(under(source.path, source.split_file)) if source.split_file else list(table)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"data source {name!r}: cannot read its captions: {type(err).__name__}: {err}") from None
    units = []
    for start in range(0, max(len(names), 1), TABLE_IMAGES_PER_UNIT):
        chunk = names[start:start + TABLE_IMAGES_PER_UNIT]
        piece = {"images": chunk, "captions": {n: table.get(n, []) for n in chunk},
                 "problems": problems if start == 0 else []}
        units.append((f"{name}#images{start}", json.dumps(piece)))
    return units


def source_units(source: SourceConfig, name: str) -> list[tuple[str, str]]:
    """(unit id, piece) for each unit of work: a shard (piece "") or a caption-table slice."""
    if source.format in ("csv", "coco"):
        return _table_units(source, name)
    return [(path, "") for path in list_shards(source.path, _SHARD_EXTENSIONS[source.format])]


def unit_key(source: SourceConfig, unit: str) -> str:
    """The unit's name within its source (a shard's path below the source's folder, a table slice's
    "images<start>"): what seeds its shuffle, so the order is the same wherever the data lives."""
    if source.format in ("csv", "coco"):
        return unit.rpartition("#")[2]
    pattern = source.path
    wildcard = min((i for i, char in enumerate(pattern) if char in "*?[{"), default=None)
    root = pattern if wildcard is None else pattern[:wildcard].rpartition("/")[0]
    if not is_uri(unit):  # local: listings come back absolute, the config's path may be relative
        root, unit = os.path.abspath(root), os.path.abspath(unit)
    root = root.rstrip("/") + "/"
    return unit[len(root):] if unit.startswith(root) else basename(unit)


def _read_unit(source: SourceConfig, unit: str, piece: str, counts: FailureCounts) -> Iterator[Sample]:
    if not piece:
        columns = {"image_column": source.image_column, "caption_column": source.caption_column}
        return read_shard(unit, counts, **(columns if source.format == "parquet" else {}))
    piece = json.loads(piece)
    captions_file = under(source.path, source.captions_file)
    for problem in piece["problems"]:
        counts.reject(FailureReason.MISSING_IMAGE, captions_file, "", problem)
    table = {name: [tuple(c) for c in captions] for name, captions in piece["captions"].items()}
    return samples_from_table(table, piece["images"], under(source.path, source.images_dir), captions_file,
                               counts, None)


def _shuffled(samples: Iterable[Sample], buffer_size: int, rng: random.Random) -> Iterator[Sample]:
    """Samples in a random order, holding at most `buffer_size` of them (a full shuffle of smaller units)."""
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


# --------------------------------------------------------------------------- the Ray Data stream


_tokenizer_slot: dict[str, object] = {}


def _shared_tokenizer(ref: ray.ObjectRef):
    """One tokenizer per worker process (its word cache warms up once), shipped via the object store.

    One slot: a new dataset (the next epoch) brings a new ref and replaces the old tokenizer.
    """
    if ref.hex() not in _tokenizer_slot:
        _tokenizer_slot.clear()
        _tokenizer_slot[ref.hex()] = ray.get(ref)
    return _tokenizer_slot[ref.hex()]


def _chunks(samples: Iterable[Sample], size: int) -> Iterator[tuple[list[Sample], bool]]:
    """(chunk, is_last) for consecutive chunks of `size` samples."""
    chunk: list[Sample] = []
    for sample in samples:
        if len(chunk) == size:
            yield chunk, False
            chunk = []
        chunk.append(sample)
    yield chunk, True


def _unit_samples(source: SourceConfig, row: dict, read_counts: FailureCounts, shuffle_buffer: int,
                  seed: int, epoch: int) -> Iterator[tuple[int, Sample]]:
    """(ordinal, sample) of one planned unit (or its slice) in its seeded shuffled order, from `row["first"]` on.

    Ordinals number the unit's samples in that order before anything is decoded, so a resumed stream
    skips the consumed ones without decoding them; bad samples keep their ordinal and are skipped later.
    """
    samples = _read_unit(source, str(row["unit"]), str(row["piece"]), read_counts)
    if row["slices"] > 1:  # a unit shared by every worker: each takes every slices-th sample, in file order
        samples = itertools.islice(samples, int(row["slice"]), None, int(row["slices"]))
    rng = random.Random(f"{seed}/{epoch}/{row['index']}/{row['key']}")
    numbered = enumerate(_shuffled(samples, shuffle_buffer, rng))
    return itertools.dropwhile(lambda item: item[0] < row["first"], numbered)


def _preprocess_units(
    rows: dict[str, np.ndarray], *, sources: dict[str, SourceConfig], preprocessor: dict, tokenizer: ray.ObjectRef,
    shuffle_buffer: int, chunk_size: int, seed: int, epoch: int, tracker: FailureTracker | None, stream: str,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray task body: planned units in, preprocessed batches out (see the module docstring)."""
    prepare = Preprocessor(tokenize=_shared_tokenizer(tokenizer), seed=seed, epoch=epoch, **preprocessor)
    for i in range(len(rows["index"])):
        row = {name: column[i] for name, column in rows.items()}
        read_counts, decode_counts = FailureCounts(), FailureCounts()
        numbered = _unit_samples(sources[row["source"]], row, read_counts, shuffle_buffer, seed, epoch)
        for chunk, is_last in _chunks(numbered, chunk_size):
            batch = prepare.batch([sample for _, sample in chunk], decode_counts, str(row["key"]))
            if is_last and tracker is not None:  # recorded before the unit's last rows can reach a worker
                # Every slice of a shared unit reads all of it: its read failures are slice 0's to count.
                read = read_counts if row["slice"] == 0 else FailureCounts()
                tracker.report(stream, str(row["source"]), f"{row['index']}/{row['slice']}",
                               read.followed_by(decode_counts))
            if batch is not None:
                kept = batch.pop("kept")
                batch["unit"] = np.full(len(kept), row["index"], dtype=np.int64)
                batch["ordinal"] = np.array([chunk[j][0] for j in kept], dtype=np.int64)
                yield batch


def _build(
    units: list[dict], sources: dict[str, SourceConfig], data_cfg: DataConfig, image_size: int,
    context_length: int, train: bool, epoch: int, tracker: FailureTracker | None, stream: str,
) -> ray.data.Dataset:
    if not data_cfg.tokenizer:
        raise ValueError("data.tokenizer is required: a tokenizer.json or CLIP's bpe_simple_vocab_16e6.txt.gz")
    tokenizer = load_tokenizer(data_cfg.tokenizer, context_length)
    preprocessor = {"image_size": image_size, "context_length": context_length, "train": train,
                    "crop_scale": tuple(data_cfg.crop_scale), "uint8_images": data_cfg.uint8_images,
                    "max_pixels": data_cfg.max_pixels}
    dataset = ray.data.from_items(units, override_num_blocks=max(len(units), 1)).map_batches(
        _preprocess_units,
        batch_size=1,  # one unit per task: units are already sized to be a task's work
        batch_format="numpy",
        num_cpus=data_cfg.preprocess_num_cpus,
        fn_kwargs={"sources": sources, "preprocessor": preprocessor, "tokenizer": ray.put(tokenizer),
                   "shuffle_buffer": data_cfg.shuffle_buffer if train else 0,
                   "chunk_size": data_cfg.preprocess_batch_size, "seed": data_cfg.seed, "epoch": epoch,
                   "tracker": tracker, "stream": stream},
    )
    dataset.context.execution_options.preserve_order = True
    return dataset


def plan_train_epoch(data_cfg: DataConfig, epoch: int) -> list[dict]:
    """The units of one training epoch in their seeded order (lists every source: plan once per job)."""
    if not data_cfg.train:
        raise DataError("data.train lists no source")
    names = _source_names(data_cfg.train)
    sources = dict(zip(names, data_cfg.train))
    pieces, mix = {}, []
    for position, (name, source) in enumerate(sources.items()):
        units = source_units(source, name)
        pieces.update(units)
        # Planned under its position, not its path (the name), so the plan does not depend on where data lives.
        mix.append(MixSource(str(position), [unit for unit, _ in units], source.weight))
    plan = []
    for i, planned in enumerate(plan_mixture(mix, seed=data_cfg.seed, epoch=epoch)):
        name = names[int(planned.source)]
        plan.append({"index": i, "source": name, "unit": planned.path, "key": unit_key(sources[name], planned.path),
                     "piece": pieces[planned.path]})
    return plan


def rank_units(plan: list[dict], rank: int, world_size: int) -> list[dict]:
    """One worker's share of an epoch's plan, in plan order (see "Shares" in the module docstring)."""
    whole = len(plan) - len(plan) % world_size
    mine = [dict(unit, slice=0, slices=1) for unit in plan[rank:whole:world_size]]
    return mine + [dict(unit, slice=rank, slices=world_size) for unit in plan[whole:]]


def build_train_dataset(
    data_cfg: DataConfig, image_size: int, context_length: int, epoch: int = 0,
    tracker: FailureTracker | None = None, stream: str | None = None, *,
    units: list[dict] | None = None, after: tuple[int, int] = (-1, -1),
) -> ray.data.Dataset:
    """One worker's training stream of one epoch: its `units` (default: the whole epoch's plan), from
    just after the row `after` = (unit index, ordinal) on, without reading any unit before it.

    Rows: image [3, S, S] float32 (uint8 with data_cfg.uint8_images), text [L]
    int64, key and image_id strings, unit (plan index) and ordinal int64 (what a
    StreamPosition records). Failures go to `tracker` under `stream` (default
    train_stream(epoch)). Lazy: nothing runs until it is iterated.
    """
    if units is None:
        units = rank_units(plan_train_epoch(data_cfg, epoch), 0, 1)
    after_unit, after_ordinal = after
    remaining = [dict(unit, first=after_ordinal + 1 if unit["index"] == after_unit else 0)
                 for unit in units if unit["index"] >= after_unit]
    sources = dict(zip(_source_names(data_cfg.train), data_cfg.train))
    return _build(remaining, sources, data_cfg, image_size, context_length, True, epoch, tracker,
                  stream or train_stream(epoch))


def build_eval_dataset(
    data_cfg: DataConfig, image_size: int, context_length: int,
    tracker: FailureTracker | None = None, stream: str = "val",
) -> ray.data.Dataset:
    """Every usable sample of data_cfg.val, in listing order: resized and centre-cropped, not shuffled."""
    if not data_cfg.val:
        raise DataError("data.val lists no source")
    sources = dict(zip(_source_names(data_cfg.val), data_cfg.val))
    units = []
    for name, source in sources.items():
        for unit, piece in source_units(source, name):
            units.append({"index": len(units), "source": name, "unit": unit, "key": unit_key(source, unit),
                          "piece": piece, "slice": 0, "slices": 1, "first": 0})
    return _build(units, sources, data_cfg, image_size, context_length, False, 0, tracker, stream)
