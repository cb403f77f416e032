"""A job's config made ready on the driver, once, before any worker starts.

`load_config` (clip_ray.config) has parsed and checked the values; `prepare_job`
settles everything that depends on where the driver runs, so the config travels
to the workers complete and they use it as it is:

- a config with a `demo:` section gets its data drawn (clip_ray.driver.demo);
- relative local paths become absolute against the driver's working directory
  (the repository root when run as the README shows; `ray job submit
  --working-dir .` makes it the uploaded copy, so data outside the repository
  needs absolute paths or URIs there);
- the MLflow URI is resolved (clip_ray.tracking.run.resolve_tracking_uri);
- `data.tokenizer: "bpe:N"` is replaced by a BPE of up to N tokens trained on the
  captions of data.train and kept under storage_path/tokenizers/, named by a
  digest of what it was trained on, so every later run and every resume of the
  same config uses the very same file;
- what the workers will open is checked (`check_inputs`), and a problem is a
  one-line ConfigError naming the key.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from clip_ray.config import Config, ConfigError, SourceConfig, to_dict
from clip_ray.data.demo.synthetic import DemoDataset
from clip_ray.data.formats import load_caption_csv, load_coco_captions, load_split, read_shard
from clip_ray.driver.demo import DEFAULT_DATA_DIR, prepare_demo
from clip_ray.driver.init_weights import prepare_initial_weights
from clip_ray.model.tokenizer import load_tokenizer, train_bpe_tokenizer
from clip_ray.storage import is_uri, list_shards, local_absolute, under
from clip_ray.tracking.run import resolve_tracking_uri, source_tags

log = logging.getLogger("clip_ray.prepare")

TRAINED_TOKENIZER_PREFIX = "bpe:"
# A vocabulary of a few tens of thousands of tokens has settled long before this many captions.
MAX_TOKENIZER_CAPTIONS = 1_000_000


@dataclass
class PreparedJob:
    """A config ready for the workers, and the demo data it points at (None for real data)."""

    config: Config
    demo: DemoDataset | None = None


def prepare_job(config: Config, demo_data_dir: str | Path = DEFAULT_DATA_DIR) -> PreparedJob:
    """The one preparation of a checked config (see the module docstring); the input is not changed.

    Template and class-name settings may be a set name rather than a file; only
    values that exist as files are taken for paths.
    """
    demo = None
    if config.demo is not None:
        config, demo = prepare_demo(config, demo_data_dir)
    config = copy.deepcopy(config)
    data = config.data
    for source in [*data.train, *data.val]:
        source.path = local_absolute(source.path)
    data.zeroshot_dir = _absolute(data.zeroshot_dir)
    data.tokenizer = _absolute(data.tokenizer)
    for name in ("zeroshot_templates", "zeroshot_class_names"):
        value = getattr(config.eval, name)
        if value and Path(value).expanduser().is_file():
            setattr(config.eval, name, local_absolute(value))
    config.cluster.storage_path = local_absolute(config.cluster.storage_path)
    config.tracking.tracking_uri = resolve_tracking_uri(config.tracking)
    config.tracking.tags = {**source_tags(), **config.tracking.tags}
    vocab_size = _trained_vocab_size(data.tokenizer)
    if vocab_size is not None:
        data.tokenizer = trained_tokenizer(config, vocab_size)
    if config.model.init_from:
        prepare_initial_weights(config)
    check_inputs(config)
    log.info("job %s prepared: tokenizer %s, storage %s, MLflow at %s", config.cluster.run_name, data.tokenizer,
             config.cluster.storage_path, config.tracking.tracking_uri)
    return PreparedJob(config, demo)


def _absolute(path: str | None) -> str | None:
    if not path or path.startswith(TRAINED_TOKENIZER_PREFIX):
        return path
    return local_absolute(path)


# --------------------------------------------------------------------------- tokenizers trained for a job


def _trained_vocab_size(spec: str) -> int | None:
    if not spec.startswith(TRAINED_TOKENIZER_PREFIX):
        return None
    size = spec[len(TRAINED_TOKENIZER_PREFIX):]
    if not size.isdigit() or int(size) < 259:
        raise ConfigError(f"data.tokenizer={spec!r}: 'bpe:N' needs N >= 259 (3 special tokens + 256 bytes)")
    return int(size)


def source_captions(source: SourceConfig) -> Iterator[str]:
    """Every caption of a source, in order (images are not decoded)."""
    if source.format in ("csv", "coco"):
        captions_file = under(source.path, source.captions_file)
        table = (load_caption_csv(captions_file, None, source.image_column, source.caption_column)
                 if source.format == "csv" else load_coco_captions(captions_file)[0])
        names = load_split(under(source.path, source.split_file)) if source.split_file else list(table)
        for name in names:
            yield from (caption for caption, _ in table.get(name, []) if caption)
        return
    extension = ".tar" if source.format == "webdataset" else ".parquet"
    columns = {"image_column": source.image_column, "caption_column": source.caption_column}
    for shard in list_shards(source.path, (extension,)):
        yield from (sample.caption for sample in read_shard(shard, **(columns if extension == ".parquet" else {})))


def trained_tokenizer(config: Config, vocab_size: int) -> str:
    """The file of a BPE trained on data.train's captions: made once, then found by its digest."""
    storage = config.cluster.storage_path
    if is_uri(storage):
        raise ConfigError(f"data.tokenizer='bpe:{vocab_size}': a tokenizer is trained into a local "
                          f"storage_path, not {storage}; train it once and give data.tokenizer its path")
    identity = {"train": to_dict(config)["data"]["train"], "vocab_size": vocab_size,
                "demo": to_dict(config.demo) if config.demo is not None else None}
    digest = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=6).hexdigest()
    path = Path(storage) / "tokenizers" / f"bpe-{vocab_size}-{digest}.json"
    if path.is_file():
        log.info("reusing tokenizer %s", path)
        return str(path)
    if not config.data.train:
        raise ConfigError(f"data.tokenizer='bpe:{vocab_size}': data.train lists no source to train it on")
    captions = itertools.islice(itertools.chain.from_iterable(source_captions(s) for s in config.data.train),
                                MAX_TOKENIZER_CAPTIONS)
    try:
        texts = list(captions)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError(f"data.train: cannot read captions to train the tokenizer: {err}") from None
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tokenizer.save(temporary)
    os.replace(temporary, path)  # whole or absent, whatever happens to this process
    log.info("trained a %d-token BPE on %d captions of data.train: %s", tokenizer.vocab_size, len(texts), path)
    return str(path)


def check_inputs(config: Config) -> None:
    """What the workers will open, looked at once on the driver: a missing tokenizer or data
    folder is a one-line ConfigError before any worker starts, not a worker's traceback."""
    data = config.data
    if not data.train:
        raise ConfigError("data.train: no source (a config with a demo section gets the demo data in "
                          "prepare_job)")
    # Every worker opens the tokenizer as a local file (on a cluster: baked into the image, or shared storage).
    if is_uri(data.tokenizer) or not Path(data.tokenizer).is_file():
        raise ConfigError(f"data.tokenizer={data.tokenizer!r}: no such local file")
    try:
        tokenizer = load_tokenizer(data.tokenizer, config.model.text.context_length)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.tokenizer={data.tokenizer!r}: {err}") from None
    if tokenizer.vocab_size > config.model.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size={config.model.text.vocab_size}: the tokenizer "
                          f"{data.tokenizer} has {tokenizer.vocab_size} tokens")
    if data.zeroshot_dir and not is_uri(data.zeroshot_dir) and not Path(data.zeroshot_dir).is_dir():
        raise ConfigError(f"data.zeroshot_dir={data.zeroshot_dir!r}: no such folder")
    for split in ("train", "val"):
        for i, source in enumerate(getattr(data, split)):
            key, path = f"data.{split}[{i}].path", Path(source.path)
            if is_uri(source.path) or any(char in source.path for char in "*?[{"):
                continue  # listed by the pipeline; remote listings cost requests
            if not path.exists():
                raise ConfigError(f"{key}={source.path!r}: no such file or folder")
            if source.format in ("webdataset", "parquet") and path.is_dir():
                extension = ".tar" if source.format == "webdataset" else ".parquet"
                if not any(path.rglob(f"*{extension}")):
                    raise ConfigError(f"{key}={source.path!r}: no {extension} shards in this folder")
