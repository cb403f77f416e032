"""The Ray Data stream that feeds training workers image-text batches of fixed shape.

One epoch, end to end:

    driver: each source -> units (its shards; or slices of a caption table)
            -> plan_mixture(seed, epoch): the epoch's units, in a seeded order
    ray.data.from_items(one row per planned unit)              nothing is materialised:
      -> map_batches(_preprocess_units), CPU tasks, any node:  rows stream through the
           read the unit (any pyarrow URI)                     object store and are gone
           -> shuffle it in a buffer of `shuffle_buffer` encoded samples
           -> decode + crop + normalise + tokenize, `preprocess_batch_size` rows at a time
           -> report the unit's FailureCounts to the FailureTracker actor
      -> streaming_split(n, equal=True)    (Ray Train's get_dataset_shard does the same)
    worker r: iter_batches(local shuffle of `shuffle_buffer` rows, drop_last) -> skip K -> torch

What is guaranteed, per epoch, for N usable samples, n workers, per-worker batch B:

- Coverage: every planned unit is read once and each of its usable samples is
  emitted once. `streaming_split(n, equal=True)` hands each worker floor(N / n)
  disjoint rows and drops the N mod n left over (Ray 2.60 truncates them; it never
  duplicates); each worker then drops its last partial batch. So every sample is
  seen at most once, all but N mod (n * B) of them (less than one global batch)
  are seen, and every worker takes the same number of steps, floor(N / (n * B)).
  With several sources weighted away from their shard counts, an "epoch" is the
  plan_mixture epoch: sum(shards) unit reads mixed by weight.
- Order: a pure function of (config, epoch, n, rank), and not of where the data
  lives: units are planned and shuffled by their source's position in the config
  and their path within the source (`unit_key`). The datasets built here run
  with `preserve_order`, under which the split assigns blocks by row counts alone
  (to the worker with the fewest rows so far) and ignores locality. Ray Train
  overwrites a dataset's execution options with its own defaults: pass
  `ray.train.DataConfig(execution_options=ingest_options())` to keep the order.
- Resume: Ray Data has no mid-epoch checkpoint. A worker that had taken K batches
  of epoch e rebuilds the epoch-e dataset (same config and world size) and calls
  `train_batches(..., skip_batches=K)`: it yields exactly the batches K, K+1, ...
  of the uninterrupted epoch. The skipped rows are read and preprocessed again,
  once, at the pipeline's full speed; nothing else is kept.
- Failures: bad samples are skipped and counted by reason inside the tasks; each
  unit's counts go to a FailureTracker actor (keyed by unit, so a retried task
  overwrites rather than adds) before the unit's last rows are emitted. When a
  worker's iterator ends, every unit has reported: `tracker.check(stream, ...)`
  then raises DataError naming a source that failed too often or gave nothing.

An epoch's dataset is built where it is needed: by the driver for Ray Train's
`datasets=`, or, for a new shard order every epoch, by rank 0 at each epoch start
(`split_for_workers` returns picklable iterators it can broadcast). World size 1
needs no split: `train_batches(dataset, ...)` reads the dataset directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np
import ray
import torch

from clip_ray.config import DataConfig, SourceConfig
from clip_ray.data.formats import DataError, FailureCounts, FailureReason, Sample, list_shards, read_shard
from clip_ray.data.formats.folders import load_caption_csv, load_coco_captions, load_split, samples_from_table
from clip_ray.data.stream.failure_tracker import FailureTracker, train_stream
from clip_ray.data.stream.mixing import MixSource, plan_mixture
from clip_ray.data.stream.preprocess import Preprocessor, normalize_on_device
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


def _preprocess_units(
    rows: dict[str, np.ndarray], *, sources: dict[str, SourceConfig], preprocessor: dict, tokenizer: ray.ObjectRef,
    shuffle_buffer: int, chunk_size: int, seed: int, epoch: int, tracker: FailureTracker | None, stream: str,
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray task body: planned units in, preprocessed batches out (see the module docstring)."""
    prepare = Preprocessor(tokenize=_shared_tokenizer(tokenizer), seed=seed, epoch=epoch, **preprocessor)
    for index, source, unit, key, piece in zip(rows["index"], rows["source"], rows["unit"], rows["key"],
                                               rows["piece"]):
        read_counts, decode_counts = FailureCounts(), FailureCounts()
        rng = random.Random(f"{seed}/{epoch}/{index}/{key}")
        samples = _shuffled(_read_unit(sources[source], unit, piece, read_counts), shuffle_buffer, rng)
        for chunk, is_last in _chunks(samples, chunk_size):
            batch = prepare.batch(chunk, decode_counts, str(key))
            if is_last and tracker is not None:  # recorded before the unit's last rows can reach a worker
                tracker.report(stream, str(source), int(index), read_counts.followed_by(decode_counts))
            if batch is not None:
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
    dataset = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
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


def build_train_dataset(
    data_cfg: DataConfig, image_size: int, context_length: int, epoch: int = 0,
    tracker: FailureTracker | None = None, stream: str | None = None,
) -> ray.data.Dataset:
    """The training stream of one epoch: mixed by weight, shard order and crops seeded by (seed, epoch).

    Rows: image [3, S, S] float32 (uint8 with data_cfg.uint8_images), text [L]
    int64, key and image_id strings. Failures go to `tracker` under `stream`
    (default train_stream(epoch)). Lazy: nothing runs until it is iterated.
    """
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
    plan = plan_mixture(mix, seed=data_cfg.seed, epoch=epoch)
    units = []
    for i, planned in enumerate(plan):
        name = names[int(planned.source)]
        units.append({"index": i, "source": name, "unit": planned.path, "key": unit_key(sources[name], planned.path),
                      "piece": pieces[planned.path]})
    return _build(units, sources, data_cfg, image_size, context_length, True, epoch, tracker,
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
                          "piece": piece})
    return _build(units, sources, data_cfg, image_size, context_length, False, 0, tracker, stream)


def ingest_options() -> "ray.data.ExecutionOptions":
    """Execution options that keep the pipeline's order; give them to ray.train.DataConfig."""
    options = ray.data.ExecutionOptions()
    options.preserve_order = True
    return options


def split_for_workers(dataset: ray.data.Dataset, world_size: int) -> list[ray.data.DataIterator]:
    """One iterator per worker: disjoint, equal row counts (see the module docstring); picklable."""
    return dataset.streaming_split(world_size, equal=True)


# --------------------------------------------------------------------------- the worker side


def worker_shuffle_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle seed of one worker in one epoch: the same in every process, and on resume."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# Batches read without a local shuffle are read-only views of the object store; the tensors made from them
# are only read or copied to the device, so torch's warning about that is noise (here, and only here).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


def _to_torch(batch: dict[str, np.ndarray], device: torch.device | str | None, normalize: bool) -> dict:
    out = dict(batch)
    for name in ("image", "text"):
        tensor = torch.from_numpy(batch[name])
        out[name] = tensor.to(device, non_blocking=True) if device is not None else tensor
    if normalize and out["image"].dtype == torch.uint8:
        out["image"] = normalize_on_device(out["image"])
    return out


def iter_worker_batches(
    data: ray.data.Dataset | ray.data.DataIterator,
    batch_size: int,
    *,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
    skip_batches: int = 0,
    drop_last: bool = True,
    device: torch.device | str | None = None,
    normalize: bool = True,
    prefetch_batches: int = 2,
) -> Iterator[dict]:
    """{"image", "text"} tensors (plus key, image_id arrays) of `batch_size` rows from one worker's share.

    uint8 images are moved to `device` first and normalised there. The first
    `skip_batches` batches are drawn and dropped unconverted (resume).
    """
    batches = data.iter_batches(
        batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=shuffle_seed,
    )
    for step, batch in enumerate(batches):
        if step >= skip_batches:
            yield _to_torch(batch, device, normalize)


def train_batches(
    data: ray.data.Dataset | ray.data.DataIterator, data_cfg: DataConfig, batch_size: int, epoch: int,
    rank: int = 0, skip_batches: int = 0, device: torch.device | str | None = None,
) -> Iterator[dict]:
    """A training worker's batches of one epoch, shuffled by (seed, epoch, rank); full batches only."""
    return iter_worker_batches(
        data, batch_size, shuffle_buffer=data_cfg.shuffle_buffer,
        shuffle_seed=worker_shuffle_seed(data_cfg.seed, epoch, rank), skip_batches=skip_batches, device=device,
    )


def eval_batches(data: ray.data.Dataset | ray.data.DataIterator, batch_size: int, **kwargs) -> Iterator[dict]:
    """Every row in order, the last batch possibly short; kwargs as for iter_worker_batches."""
    return iter_worker_batches(data, batch_size, drop_last=False, **kwargs)
