"""The Ray Data training stream on real Flickr8k photos, with a real local Ray.

Each worker's share of an epoch is its own dataset (pipeline.rank_units); here the
shares of a world are read one after another in the test process.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from clip_ray.config import DataConfig, SourceConfig
from clip_ray.data.stream import pipeline
from clip_ray.data.formats import (
    DataError, FailureCounts, ShardWriter, list_shards, load_split, read_caption_csv, read_shard,
)
from clip_ray.data.stream.failure_tracker import FailureTracker, train_stream
from clip_ray.data.stream.batches import StreamPosition, TrainBatches, eval_batches, iter_worker_batches
from clip_ray.data.stream.pipeline import (
    build_eval_dataset, build_train_dataset, plan_train_epoch, rank_units, unit_key,
)
from clip_ray.data.stream.preprocess import CLIP_MEAN, CLIP_STD, Preprocessor, normalize
from clip_ray.model.tokenizer import load_tokenizer, train_bpe_tokenizer

NUM_PHOTOS = 121  # x 5 captions = 605 samples: not a multiple of 2 or 3 workers
IMAGE_SIZE = 32
CONTEXT_LENGTH = 20
BATCH = 32
# For conftest's ray_cluster (laid over its defaults; the dashboard stays off).
RAY_INIT_KWARGS = {"num_cpus": 2, "configure_logging": False, "log_to_driver": False}


@pytest.fixture(scope="module", autouse=True)
def local_ray(ray_cluster):
    """Every test runs on conftest's local Ray cluster, with Ray Data's progress bars off."""
    ray.data.DataContext.get_current().enable_progress_bars = False


@pytest.fixture(scope="module")
def flickr(flickr8k_dir: Path, tmp_path_factory) -> dict:
    """Real photos and captions as WebDataset shards of 100 samples, plus a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("flickr")
    split = root / "split.txt"
    split.write_text("\n".join(load_split(flickr8k_dir / "splits" / "test.txt")[:NUM_PHOTOS]) + "\n")
    samples = list(read_caption_csv(flickr8k_dir, split_file=split))
    with ShardWriter(root / "shards", samples_per_shard=100) as writer:
        for s in samples:
            writer.write(s.key, s.image, s.caption, meta=s.meta)
    tokenizer = train_bpe_tokenizer([s.caption for s in samples], vocab_size=512)
    return {"root": root, "split": split, "shards": str(root / "shards"), "samples": samples,
            "tokenizer": str(tokenizer.save(root / "tokenizer.json"))}


def _config(flickr, sources=None, **overrides) -> DataConfig:
    sources = sources or [SourceConfig(path=flickr["shards"])]
    return DataConfig(train=sources, val=sources, tokenizer=flickr["tokenizer"], crop_scale=(0.5, 1.0),
                      shuffle_buffer=200, preprocess_batch_size=40, seed=7, **overrides)


def _share(cfg, epoch, rank, world_size, tracker=None, stream=None, start=StreamPosition()):
    """Worker `rank`'s dataset of the epoch, from `start` on."""
    units = rank_units(plan_train_epoch(cfg, epoch), rank, world_size)
    return build_train_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, epoch, tracker, stream, units=units, after=start.after)


def _batches(cfg, dataset, epoch, rank=0, start=StreamPosition()) -> TrainBatches:
    return TrainBatches(dataset, BATCH, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, epoch=epoch, rank=rank,
                        start=start)


def _train_epoch(cfg, epoch, world_size) -> list[list[dict]]:
    """Each worker's batches of one epoch (all it has: the loop stops every worker at the shortest share)."""
    return [list(_batches(cfg, _share(cfg, epoch, rank, world_size), epoch, rank)) for rank in range(world_size)]


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


@pytest.fixture(scope="module")
def epoch0(flickr) -> list[list[dict]]:
    return _train_epoch(_config(flickr), epoch=0, world_size=2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_workers_share_an_epoch_exactly_once(flickr, world_size):
    """Shares without the batching: disjoint, together every sample; as even as whole 100-sample shards allow
    (7 shards: the last 7 mod n are shared sample by sample)."""
    all_keys = {s.key for s in flickr["samples"]}
    assert len(all_keys) == 5 * NUM_PHOTOS
    cfg = _config(flickr)
    shares = [_keys(iter_worker_batches(_share(cfg, 0, rank, world_size), BATCH)) for rank in range(world_size)]
    seen = [key for share in shares for key in share]
    assert len(seen) == len(set(seen)) and set(seen) == all_keys
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 100, sizes


def test_training_batches_are_full_and_disjoint(flickr, epoch0):
    all_keys = {s.key for s in flickr["samples"]}
    assert all(len(batch["key"]) == BATCH for worker in epoch0 for batch in worker)
    # Three whole shards each and the plan's last shard halved; a share gives all the full batches it holds.
    sizes = {shard: sum(1 for _ in read_shard(shard)) for shard in list_shards(flickr["shards"])}
    for rank, worker in enumerate(epoch0):
        rows = sum(len(range(u["slice"], sizes[u["unit"]], u["slices"]))
                   for u in rank_units(plan_train_epoch(_config(flickr), 0), rank, 2))
        assert len(worker) == rows // BATCH
    trained = [key for worker in epoch0 for key in _keys(worker)]
    assert len(trained) == len(set(trained)) and set(trained) <= all_keys


def test_order_is_a_function_of_seed_and_epoch(flickr, epoch0):
    cfg = _config(flickr)
    again = _train_epoch(cfg, epoch=0, world_size=2)
    for first, second in zip(epoch0, again):
        assert _keys(first) == _keys(second)
        assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
                   for a, b in zip(first, second))
    epoch1 = _train_epoch(cfg, epoch=1, world_size=2)
    assert _keys(epoch1[0]) != _keys(epoch0[0])
    # Another epoch crops the same photo differently.
    by_key = {key: batch["image"][i] for batch in epoch0[0] + epoch0[1] for i, key in enumerate(batch["key"])}
    later = {key: batch["image"][i] for batch in epoch1[0] + epoch1[1] for i, key in enumerate(batch["key"])}
    common = sorted(set(by_key) & set(later))[:20]
    assert common and all(not torch.equal(by_key[k], later[k]) for k in common)
    # Within an epoch, the captions of one photo are spread out rather than side by side.
    photos = [key.rsplit("_", 1)[0] for key in _keys(epoch0[0])]
    assert sum(a == b for a, b in zip(photos, photos[1:])) < len(photos) // 10


def test_order_does_not_depend_on_where_the_data_lives(flickr, tmp_path):
    """The same shards in two folders, one named by a relative path: the same plan, the same shuffles,
    the same crops."""
    here = shutil.copytree(flickr["shards"], tmp_path / "here" / "shards")
    elsewhere = shutil.copytree(flickr["shards"], tmp_path / "elsewhere" / "one" / "level" / "deeper")
    runs = []
    for folder in (str(here), os.path.relpath(elsewhere)):
        cfg = _config(flickr, sources=[SourceConfig(path=folder)])
        dataset = build_train_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, epoch=1)
        runs.append(list(_batches(cfg, dataset, epoch=1)))
    assert len(_keys(runs[0])) == (5 * NUM_PHOTOS) // BATCH * BATCH
    assert _keys(runs[0]) == _keys(runs[1])
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(*runs))


@pytest.mark.parametrize("world_size", [2])  # one worker is the simpler case of the same code
def test_resume_reads_only_what_is_left(flickr, world_size):
    """From the position after batch k, the rebuilt stream yields exactly the batches k+1, ... of the
    uninterrupted share, bit for bit, and decodes at most one shuffle window (192 rows) beyond them."""
    cfg = _config(flickr)
    window = 6 * BATCH  # shuffle_buffer 200 / batch 32, rounded
    for rank in range(world_size):
        stream = _batches(cfg, _share(cfg, 0, rank, world_size), 0, rank)
        whole, positions = [], []
        for batch in stream:
            whole.append(batch)
            positions.append(stream.position)
        assert positions[3] == StreamPosition(0, 4, -1, -1)
        # After a window's last batch, the position points past the window: its last row in stream order.
        last_row = max((int(u), int(o)) for batch in whole[:6] for u, o in zip(batch["unit"], batch["ordinal"]))
        assert positions[5] == StreamPosition(1, 0, *last_row)
        for k in (0, 3, 5, len(whole) - 2):  # inside the first window, at its end, inside the last
            tracker = FailureTracker()
            stream_name = f"resume-{world_size}-{rank}-{k}"
            dataset = _share(cfg, 0, rank, world_size, tracker, stream_name, start=positions[k])
            rest = list(_batches(cfg, dataset, 0, rank, start=positions[k]))
            assert _keys(rest) == _keys(whole[k + 1:]), k
            assert all(torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
                       for a, b in zip(rest, whole[k + 1:]))
            decoded = tracker.total(stream_name).ok
            assert decoded <= (len(whole) - k - 1) * BATCH + window + BATCH, (k, decoded)
        # Resumed near the end, the share's first units are not even read.
        late = _keys(iter_worker_batches(_share(cfg, 0, rank, world_size, start=positions[-2]), BATCH))
        assert len(late) < window + 2 * BATCH


def test_batches_have_fixed_shapes_and_the_pixels_of_the_sample(flickr, epoch0):
    batch = epoch0[1][0]
    assert batch["image"].shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (BATCH, CONTEXT_LENGTH) and batch["text"].dtype == torch.int64
    low = min((0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    high = max((1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD))
    assert low - 1e-5 <= batch["image"].min() < 0 < batch["image"].max() <= high + 1e-5
    # The worker's row is what the preprocessor makes of that sample in this process.
    # Crops are seeded by the shard's name within its source, not by where the shards live.
    source = SourceConfig(path=flickr["shards"])
    samples = {s.key: (s, unit_key(source, shard)) for shard in list_shards(flickr["shards"])
               for s in read_shard(shard)}
    tokenizer = load_tokenizer(flickr["tokenizer"])
    prepare = Preprocessor(IMAGE_SIZE, CONTEXT_LENGTH, tokenizer, train=True, crop_scale=(0.5, 1.0), seed=7, epoch=0)
    expected = [prepare.batch([samples[k][0]], FailureCounts(), samples[k][1]) for k in batch["key"]]
    expected_images = np.concatenate([e["image"] for e in expected])
    torch.testing.assert_close(batch["image"], torch.from_numpy(expected_images), rtol=0, atol=1e-6)
    assert torch.equal(batch["text"], torch.from_numpy(np.concatenate([e["text"] for e in expected])))


def test_uint8_images_normalised_on_the_worker_match_float_images(flickr, epoch0):
    """World size 1, in-process: the dataset itself is the worker's share; crops depend on the sample only."""
    cfg = _config(flickr, uint8_images=True)
    dataset = build_train_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, epoch=0)
    raw, on_device = next(zip(iter_worker_batches(dataset, BATCH, normalize=False), _batches(cfg, dataset, 0)))
    assert raw["image"].dtype == torch.uint8 and raw["image"].shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert on_device["image"].dtype == torch.float32
    as_float = {key: batch["image"][i] for worker in epoch0 for batch in worker for i, key in enumerate(batch["key"])}
    for batch in (raw, on_device):
        common = [i for i, key in enumerate(batch["key"]) if key in as_float]
        assert len(common) > BATCH // 2
        images = batch["image"][common]
        if images.dtype == torch.uint8:
            images = torch.from_numpy(normalize(images.numpy()))
        expected = torch.stack([as_float[batch["key"][i]] for i in common])
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


def _write_bad_shard(path: Path, good, photo: bytes) -> dict[str, int]:
    """A shard of `good` samples and every kind of bad one made from `photo`; returns the expected counts."""
    bad = [("empty", b"", "an empty file"), ("blank", photo, "   "), ("html", b"<html>404</html>", "a web page"),
           ("cut1", photo[: len(photo) // 2], "half a photo"), ("cut2", photo[: len(photo) // 3], "a third"),
           ("header", photo[:20], "only the header")]
    with ShardWriter(path, samples_per_shard=1000, prefix="bad-") as writer:
        for i, s in enumerate(good):
            writer.write(f"good{i}", s.image, s.caption)
        for key, image, caption in bad:
            writer.write(key, image, caption)
    return {"zero_byte_image": 1, "empty_caption": 1, "not_an_image": 1, "truncated_image": 2, "corrupt_image": 1}


def test_failure_counts_come_back_exactly(flickr, tmp_path):
    expected = _write_bad_shard(tmp_path / "mixed", flickr["samples"][:30], flickr["samples"][0].image)
    cfg = _config(flickr, sources=[SourceConfig(path=str(tmp_path / "mixed"))], max_failure_fraction=0.2)
    tracker = FailureTracker()
    rows = _keys(iter_worker_batches(build_train_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, 0, tracker), 8,
                                     drop_last=False))
    assert sorted(rows) == sorted(f"good{i}" for i in range(30))
    counts = tracker.counts(train_stream(0))
    assert list(counts) == [str(tmp_path / "mixed")]
    assert counts[str(tmp_path / "mixed")].ok == 30 and counts[str(tmp_path / "mixed")].failed == expected
    assert tracker.total(train_stream(0)).as_metrics()["data/truncated_image"] == 2
    tracker.check(train_stream(0), cfg.max_failure_fraction)  # 6 of 36 failed: within 20%
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "mixed")) + ".*16.7% of items failed"):
        tracker.check(train_stream(0), 0.1)
    tracker.check(train_stream(0), 0.1, final=False)  # too few items to judge mid-epoch


def test_a_shard_shared_by_every_worker_is_split_and_counted_once(flickr, tmp_path):
    """One shard, three workers: each decodes every third sample; read failures are counted once."""
    expected = _write_bad_shard(tmp_path / "mixed", flickr["samples"][:30], flickr["samples"][0].image)
    cfg = _config(flickr, sources=[SourceConfig(path=str(tmp_path / "mixed"))], max_failure_fraction=0.2)
    tracker = FailureTracker()
    shares = [_keys(iter_worker_batches(_share(cfg, 0, rank, 3, tracker), 8)) for rank in range(3)]
    assert sorted(key for share in shares for key in share) == sorted(f"good{i}" for i in range(30))
    assert all(9 <= len(share) <= 11 for share in shares), shares
    counts = tracker.counts(train_stream(0))[str(tmp_path / "mixed")]
    assert counts.ok == 30 and counts.failed == expected


@pytest.mark.parametrize("broken", ["all_bad", "missing"])
def test_a_source_without_usable_samples_is_named(flickr, tmp_path, broken):
    if broken == "all_bad":
        _write_bad_shard(tmp_path / "bad", [], flickr["samples"][0].image)
        path = str(tmp_path / "bad")
    else:
        path = str(tmp_path / "nowhere" / "{00000..00001}.tar")
    first_shard = list_shards(flickr["shards"])[0]
    # Weights equal to shard counts: each shard is read once.
    good = SourceConfig(path=first_shard, weight=1)
    cfg = _config(flickr, sources=[good, SourceConfig(path=path, weight=len(list_shards(path)))])
    tracker = FailureTracker()
    dataset = build_train_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, 0, tracker)
    rows = _keys(iter_worker_batches(dataset, BATCH, drop_last=False))
    assert sorted(rows) == sorted(s.key for s in read_shard(first_shard))
    counts = tracker.counts(train_stream(0))
    assert counts[path].ok == 0 and counts[first_shard].ok == len(rows) == 100
    if broken == "missing":
        assert counts[path].failed == {"unreadable_shard": 2}  # both shards of the pattern
    with pytest.raises(DataError, match=re.escape(repr(path)) + " yielded no usable sample"):
        tracker.check(train_stream(0), 0.5)


def test_caption_table_source_and_eval_order(flickr, flickr8k_dir, monkeypatch):
    """A folder + captions.csv source read in slices of 16 photos, for training and for evaluation."""
    monkeypatch.setattr(pipeline, "TABLE_IMAGES_PER_UNIT", 16)
    table = SourceConfig(path=str(flickr8k_dir), format="csv", split_file=str(flickr["split"]))
    cfg = _config(flickr, sources=[table])
    tracker = FailureTracker()
    in_order = [s.key for s in flickr["samples"]]

    trained = _keys(iter_worker_batches(build_train_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, 0, tracker), BATCH,
                                        drop_last=False))
    assert sorted(trained) == sorted(in_order) and trained != in_order
    assert tracker.counts(train_stream(0))[str(flickr8k_dir)].ok == len(in_order)

    batches = list(eval_batches(build_eval_dataset(cfg, IMAGE_SIZE, CONTEXT_LENGTH, tracker), 100))
    assert [len(b["key"]) for b in batches] == [100] * 6 + [5]
    assert _keys(batches) == in_order
    assert [i for b in batches for i in b["image_id"]] == [s.meta["image"] for s in flickr["samples"]]
    assert Counter(tracker.counts("val")[str(flickr8k_dir)].failed) == Counter()
    prepare = Preprocessor(IMAGE_SIZE, CONTEXT_LENGTH, load_tokenizer(flickr["tokenizer"]), train=False)
    expected = prepare.batch(flickr["samples"][:100], FailureCounts())
    assert np.array_equal(batches[0]["image"].numpy(), expected["image"])
