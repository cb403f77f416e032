"""Readers and writers of every format, on real Flickr8k and CIFAR-10 photos."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_ray.data.formats import (
    FailureCounts, ParquetWriter, Sample, ShardWriter, expand_shard_pattern, list_image_folder, list_shards,
    load_caption_csv, load_split, read_caption_csv, read_coco_captions, read_image_folder, read_parquet_file,
    read_shard, read_tar_shard,
)
from clip_ray.data.stream.mixing import MixSource, plan_mixture

pytestmark = pytest.mark.shared_data

NUM_PHOTOS = 200


@pytest.fixture(scope="module")
def flickr_samples(flickr8k_dir: Path, tmp_path_factory) -> list[Sample]:
    """The first caption of 200 real test-split photos, read through the folder+CSV reader."""
    names = load_split(flickr8k_dir / "splits" / "test.txt")[:NUM_PHOTOS]
    split = tmp_path_factory.mktemp("split") / "subset.txt"
    split.write_text("\n".join(names) + "\n")
    counts = FailureCounts()
    samples = [s for s in read_caption_csv(flickr8k_dir, counts, split_file=split) if s.key.endswith("_0")]
    assert counts.to_dict()["failed"] == {} and counts.ok == 5 * NUM_PHOTOS
    assert [s.meta["image"] for s in samples] == names
    return samples


def _write_shards(samples, out_dir, **kwargs) -> list[str]:
    with ShardWriter(out_dir, **kwargs) as writer:
        for s in samples:
            writer.write(s.key, s.image, s.caption, image_ext=s.image_ext, meta=s.meta)
    return writer.close()


def _as_tuples(samples) -> list[tuple]:
    return [(s.key, s.image, s.caption, s.image_ext, s.meta) for s in samples]


def test_shard_round_trip(flickr_samples, flickr8k_dir, tmp_path):
    shards = _write_shards(flickr_samples, tmp_path / "out", samples_per_shard=64, prefix="flickr-")
    assert shards == [str(tmp_path / "out" / f"flickr-{i:05d}.tar") for i in range(math.ceil(NUM_PHOTOS / 64))]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [Path(s).name for s in shards]

    counts = FailureCounts()
    back = [s for shard in list_shards(tmp_path / "out") for s in read_tar_shard(shard, counts)]
    assert _as_tuples(back) == _as_tuples(flickr_samples)
    assert back[0].image == (flickr8k_dir / "images" / back[0].meta["image"]).read_bytes()
    assert counts.ok == NUM_PHOTOS and counts.num_failed == 0
    assert Counter(s.source for s in back) == {shards[0]: 64, shards[1]: 64, shards[2]: 64, shards[3]: 8}

    pattern = str(tmp_path / "out" / "flickr-{00001..00002}.tar")
    middle = [s for shard in list_shards(pattern) for s in read_shard(shard)]
    assert [s.key for s in middle] == [s.key for s in flickr_samples[64:192]]


def test_shards_readable_by_webdataset(flickr_samples, tmp_path):
    """The layout is the one the webdataset library (and img2dataset) use."""
    wds = pytest.importorskip("webdataset")
    shards = _write_shards(flickr_samples[:10], tmp_path, samples_per_shard=4)
    got = [(s["__key__"], s["jpg"], s["txt"].decode()) for s in wds.WebDataset(shards, shardshuffle=False)]
    assert got == [(s.key, s.image, s.caption) for s in flickr_samples[:10]]


def test_shard_rewrite_leaves_no_duplicates_or_temporaries(flickr_samples, tmp_path):
    out = tmp_path / "out"
    first = _write_shards(flickr_samples, out, samples_per_shard=50)
    first_bytes = [Path(p).read_bytes() for p in first]
    # A crashed run: shard 4 half written under its temporary name, then an error.
    with pytest.raises(RuntimeError, match="crash"):
        with ShardWriter(out, samples_per_shard=50, start_index=4) as writer:
            for s in flickr_samples[:30]:
                writer.write(s.key, s.image, s.caption)
            assert (out / "00004.tar.tmp").is_file()
            raise RuntimeError("crash")
    (out / "00002.tar.tmp").write_bytes(b"left over by a killed process")

    second = _write_shards(flickr_samples, out, samples_per_shard=50)
    assert second == first and len(second) == 4
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.tar" for i in range(4)]
    assert [Path(p).read_bytes() for p in second] == first_bytes  # deterministic bytes
    keys = [s.key for shard in list_shards(out) for s in read_tar_shard(shard)]
    assert keys == [s.key for s in flickr_samples]


def test_shard_writer_refuses_keys_that_break_grouping(tmp_path):
    with ShardWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="no '.'"):
            writer.write("a.b", b"x", "c")
        writer.write("a", b"x", "c")
        with pytest.raises(ValueError, match="twice"):
            writer.write("a", b"x", "c")
        with pytest.raises(ValueError, match="image_ext"):
            writer.write("b", b"x", "c", image_ext="exe")


def test_parquet_round_trip(flickr_samples, tmp_path):
    path = tmp_path / "pq" / "part-0.parquet"
    with ParquetWriter(path, rows_per_group=64) as writer:
        for s in flickr_samples:
            writer.write(s.key, s.image, s.caption, s.image_ext, s.meta)
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]
    assert pq.ParquetFile(path).num_row_groups == math.ceil(NUM_PHOTOS / 64)
    counts = FailureCounts()
    back = list(read_shard(path, counts))
    assert _as_tuples(back) == _as_tuples(flickr_samples)
    assert counts.ok == NUM_PHOTOS and counts.num_failed == 0

    with ParquetWriter(path, rows_per_group=64) as writer:  # a re-run replaces the file
        writer.write("only", flickr_samples[0].image, "one row")
    assert [s.key for s in read_parquet_file(path)] == ["only"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["part-0.parquet"]


def test_parquet_with_other_column_names(flickr_samples, tmp_path):
    """A Hugging Face style file: image as a {bytes, path} struct, caption as 'text', no key column."""
    images = [{"bytes": s.image, "path": s.meta["image"]} for s in flickr_samples[:5]]
    table = pa.table({"img": images, "text": [s.caption for s in flickr_samples[:5]]})
    pq.write_table(table, tmp_path / "hf.v1.parquet", row_group_size=2)
    back = list(read_parquet_file(tmp_path / "hf.v1.parquet", image_column="img", caption_column="text"))
    assert [s.key for s in back] == [f"hf_v1_{i}" for i in range(5)]
    expected = [(s.image, s.caption, "jpg") for s in flickr_samples[:5]]
    assert [(s.image, s.caption, s.image_ext) for s in back] == expected


def test_caption_csv_counts_on_flickr8k(flickr8k_dir):
    table = load_caption_csv(flickr8k_dir / "captions.csv")
    assert len(table) == 8091 and sum(map(len, table.values())) == 40455
    for split, images in (("train", 7091), ("test", 1000)):
        names = load_split(flickr8k_dir / "splits" / f"{split}.txt")
        assert len(names) == images
        assert sum(len(table[name]) for name in names) == 5 * images


def test_caption_csv_reader_on_flickr8k_test_split(flickr8k_dir):
    counts = FailureCounts()
    samples = list(read_caption_csv(flickr8k_dir, counts, split_file="splits/test.txt"))
    assert counts.ok == len(samples) == 5000 and counts.num_failed == 0
    assert len({s.meta["image"] for s in samples}) == 1000 and len({s.key for s in samples}) == 5000
    first = samples[0]
    assert first.image == (flickr8k_dir / "images" / first.meta["image"]).read_bytes()
    assert first.source == str(flickr8k_dir / "captions.csv")


def test_coco_reader_on_flickr_photos(flickr8k_dir, tmp_path):
    table = load_caption_csv(flickr8k_dir / "captions.csv")
    names = list(table)[:3]
    coco = {
        "images": [{"id": 10 + i, "file_name": name} for i, name in enumerate(names)],
        "annotations": [{"id": 100 + 10 * i + j, "image_id": 10 + i, "caption": caption}
                        for i, name in enumerate(names) for j, (caption, _) in enumerate(table[name][:2])],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    counts = FailureCounts()
    samples = list(read_coco_captions(tmp_path / "captions.json", flickr8k_dir / "images", counts))
    assert counts.ok == 6 and counts.num_failed == 0
    assert [(s.meta["image"], s.caption) for s in samples] == [(n, c) for n in names for c, _ in table[n][:2]]
    assert samples[1].meta == {"image": names[0], "image_id": 10, "annotation_id": 101}
    assert samples[2].image == (flickr8k_dir / "images" / names[1]).read_bytes()


def test_image_folder_on_cifar10(cifar10_dir):
    classes, images = list_image_folder(cifar10_dir)
    assert classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert len(images) == 10_000 and Counter(i for _, i in images) == {i: 1000 for i in range(10)}
    counts = FailureCounts()
    items = list(islice(read_image_folder(cifar10_dir, counts), 1001))
    assert [(x.class_index, x.class_name) for x in items[999:]] == [(0, "airplane"), (1, "automobile")]
    assert items[0].key == "airplane/0000" and items[0].image == (cifar10_dir / "airplane" / "0000.jpg").read_bytes()
    assert counts.ok == 1001


def test_expand_shard_pattern():
    assert expand_shard_pattern("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
    assert expand_shard_pattern("s/{8..10}.tar") == ["s/8.tar", "s/9.tar", "s/10.tar"]
    assert expand_shard_pattern("{a,b}-{0..1}.tar") == ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
    assert expand_shard_pattern("s3://b/{x,y{1..2}}.tar") == ["s3://b/x.tar", "s3://b/y1.tar", "s3://b/y2.tar"]
    assert expand_shard_pattern("plain.tar") == ["plain.tar"]
    for bad in ("s/{0..2.tar", "s/0..2}.tar", "s/{5..3}.tar"):
        with pytest.raises(ValueError):
            expand_shard_pattern(bad)


def test_list_shards_dirs_globs_and_uris(tmp_path):
    for name in ("b/00001.tar", "b/00000.tar", "b/sub/00002.tar", "b/stats.json", "c/x.parquet"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    b = str(tmp_path / "b")
    assert list_shards(b) == [f"{b}/00000.tar", f"{b}/00001.tar", f"{b}/sub/00002.tar"]
    assert list_shards([f"{b}/*.tar", f"{b}/0000{{0..1}}.tar"]) == [f"{b}/00000.tar", f"{b}/00001.tar"]
    assert list_shards(f"file://{tmp_path}/c", extensions=(".parquet",)) == [f"file://{tmp_path}/c/x.parquet"]
    assert list_shards(f"{tmp_path}/missing.tar") == [f"{tmp_path}/missing.tar"]


def test_plan_mixture_is_deterministic_and_weighted():
    big = MixSource("big", [f"big/{i}.tar" for i in range(9)], weight=2.0)
    small = MixSource("small", ["small/0.tar", "small/1.tar"], weight=1.0)
    plan = plan_mixture([big, small], seed=7, num_shards=12)
    assert plan == plan_mixture([big, small], seed=7, num_shards=12)
    assert plan != plan_mixture([big, small], seed=8, num_shards=12)
    assert "".join(p.source[0] for p in plan) == "bsbbsbbsbbsb"  # 8:4, spread evenly
    small_reads = [p for p in plan if p.source == "small"]
    assert [p.repeat for p in small_reads] == [0, 0, 1, 1]  # every shard once before any repeats
    assert sorted(p.path for p in small_reads[:2]) == small.shards
    # A down-weighted source covers all its shards across epochs before repeating any.
    epochs = [[p for p in plan_mixture([big, small], seed=7, epoch=e, num_shards=6) if p.source == "big"]
              for e in range(3)]
    first_pass = [p.path for ep in epochs for p in ep if p.repeat == 0]
    assert sorted(first_pass) == sorted(big.shards) and len(epochs[0]) == 4
    default = plan_mixture([big, small], seed=0)
    assert len(default) == 11 and Counter(p.source for p in default) == {"big": 7, "small": 4}
    with pytest.raises(ValueError, match="no shards"):
        plan_mixture([MixSource("empty", [])], seed=0)


def test_sample_row_round_trip():
    sample = Sample("k", b"\xff\xd8", "a dog", "jpg", {"url": "u", "n": 1}, "s.tar")
    row = sample.to_row()
    assert isinstance(row["meta"], str)
    assert Sample.from_row(row) == sample
