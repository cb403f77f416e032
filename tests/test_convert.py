"""The converter on a real local Ray cluster and real Flickr8k photos: round trips, re-runs, bad input, resizing."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image
from repo_paths import REPO_ROOT
from tar_helpers import write_tar

from clip_ray.config import SourceConfig
from clip_ray.data.formats import DataError, list_shards, load_split, read_caption_csv, read_shard
from clip_ray.data.offline.convert import ConvertOptions, convert

pytestmark = [pytest.mark.shared_data, pytest.mark.usefixtures("ray_cluster")]  # conftest: 4 CPUs, local


@pytest.fixture(scope="module")
def split60(flickr8k_dir, tmp_path_factory) -> Path:
    """60 training photos, 300 captions: big enough for several partitions, small enough to be quick."""
    path = tmp_path_factory.mktemp("split") / "train60.txt"
    path.write_text("\n".join(load_split(flickr8k_dir / "splits" / "train.txt")[:60]) + "\n")
    return path


@pytest.fixture(scope="module")
def flickr_source(flickr8k_dir, split60) -> SourceConfig:
    return SourceConfig(path=str(flickr8k_dir), format="csv", split_file=str(split60))


@pytest.fixture(scope="module")
def flickr_expected(flickr8k_dir, split60) -> list:
    return list(read_caption_csv(flickr8k_dir, split_file=split60))


def read_back(out_dir: Path, extension: str) -> list:
    return [sample for shard in list_shards(str(out_dir), (extension,)) for sample in read_shard(shard)]


def folder_bytes(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.iterdir()) if path.name != "stats.json"}


def photo(flickr8k_dir: Path, i: int) -> bytes:
    return (flickr8k_dir / "images" / load_split(flickr8k_dir / "splits" / "train.txt")[i]).read_bytes()


def assert_same_samples(got: list, expected: list) -> None:
    assert [s.key for s in got] == [s.key for s in expected]
    assert [s.caption for s in got] == [s.caption for s in expected]
    assert all(g.image == e.image for g, e in zip(got, expected))
    assert [s.meta["image"] for s in got] == [s.meta["image"] for s in expected]


def test_caption_folder_to_tar_round_trip(flickr_source, flickr_expected, tmp_path):
    stats = convert(flickr_source, str(tmp_path), ConvertOptions(samples_per_shard=100))

    assert len(flickr_expected) == 300
    assert_same_samples(read_back(tmp_path, ".tar"), flickr_expected)
    assert stats["samples_written"] == 300 and stats["shards_written"] == 3 and stats["failures"] == {}
    assert stats["shards"] == ["00000_00000.tar", "00001_00000.tar", "00002_00000.tar"]
    assert [len(list(read_shard(tmp_path / name))) for name in stats["shards"]] == [100, 100, 100]
    assert json.loads((tmp_path / "stats.json").read_text())["samples_written"] == 300


def test_caption_folder_to_parquet_round_trip(flickr_source, flickr_expected, tmp_path):
    # 128 captions per shard: partitions hold whole photos, 25 photos (125 captions) each.
    stats = convert(flickr_source, str(tmp_path), ConvertOptions(samples_per_shard=128, output_format="parquet"))

    assert_same_samples(read_back(tmp_path, ".parquet"), flickr_expected)
    assert stats["samples_written"] == 300 and stats["shards_written"] == 3
    assert [len(list(read_shard(tmp_path / name))) for name in stats["shards"]] == [125, 125, 50]


def test_rerun_reuses_or_rewrites_identically_and_never_duplicates(flickr_source, flickr_expected, tmp_path):
    options = ConvertOptions(samples_per_shard=100)
    convert(flickr_source, str(tmp_path), options)
    first = folder_bytes(tmp_path)
    mtimes = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    # What a crashed or older run leaves behind, and a file that is not the converter's.
    (tmp_path / "00001_00000.tar.tmp").write_bytes(b"half a shard")
    shutil.copy(tmp_path / "00000_00000.tar", tmp_path / "00007_00000.tar")
    (tmp_path / "00007_stats.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")

    again = convert(flickr_source, str(tmp_path), options)
    assert again["partitions_reused"] == 3 and again["samples_written"] == 300
    assert folder_bytes(tmp_path) == {**first, "notes.txt": b"mine"}
    assert all(path.stat().st_mtime_ns == mtimes[path.name] for path in tmp_path.glob("0000*"))

    rewritten = convert(flickr_source, str(tmp_path), ConvertOptions(samples_per_shard=100, overwrite=True))
    assert rewritten["partitions_reused"] == 0
    assert folder_bytes(tmp_path) == {**first, "notes.txt": b"mine"}

    # Finer shards over the same folder: every old shard is replaced or removed, nothing counted twice.
    finer = convert(flickr_source, str(tmp_path), ConvertOptions(samples_per_shard=50))
    assert finer["shards_written"] == 6 and sorted(p.name for p in tmp_path.glob("*.tar")) == finer["shards"]
    assert_same_samples(read_back(tmp_path, ".tar"), flickr_expected)
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_samples_are_skipped_and_counted_exactly(flickr8k_dir, tmp_path):
    good = [photo(flickr8k_dir, i) for i in range(6)]
    corrupt = b"\xff\xd8\xff\xe0" + random.Random(0).randbytes(3000)
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_tar(inputs / "a.tar", [
        ("g0.jpg", good[0]), ("g0.txt", b"a dog on the grass"),
        ("bad_jpeg.jpg", corrupt), ("bad_jpeg.txt", b"noise behind a JPEG header"),
        ("g1.jpg", good[1]), ("g1.txt", b"two children"),
        ("blank.jpg", good[2]), ("blank.txt", b"  \n"),
        ("g2.jpg", good[3]), ("g2.txt", b"a red car"),
    ])
    write_tar(inputs / "b.tar", [
        ("g3.jpg", good[4]), ("g3.txt", b"a man climbing"),
        ("cut.jpg", good[5][: len(good[5]) // 2]), ("cut.txt", b"half a photo"),
        ("page.jpg", b"<html>404</html>"), ("page.txt", b"an error page"),
        ("g4.jpg", good[0]), ("g4.txt", b"the first photo again"),
        ("mute.jpg", good[1]),
    ])
    source = SourceConfig(path=str(inputs), format="webdataset")

    stats = convert(source, str(tmp_path / "out"), ConvertOptions(samples_per_shard=2))
    assert stats["failures"] == {"corrupt_image": 1, "empty_caption": 1, "missing_caption": 1,
                                 "not_an_image": 1, "truncated_image": 1}
    assert stats["samples_written"] == 5 and stats["samples_seen"] == 10
    assert stats["shards"] == ["00000_00000.tar", "00000_00001.tar", "00001_00000.tar"]
    assert [s.key for s in read_back(tmp_path / "out", ".tar")] == ["g0", "g1", "g2", "g3", "g4"]

    unchecked = convert(source, str(tmp_path / "raw"), ConvertOptions(samples_per_shard=2, validate_images=False))
    assert unchecked["failures"] == {"empty_caption": 1, "missing_caption": 1}
    assert unchecked["samples_written"] == 8

    with pytest.raises(DataError, match="50.0% of items failed"):
        convert(source, str(tmp_path / "strict"), ConvertOptions(max_failure_fraction=0.2))
    assert json.loads((tmp_path / "strict" / "stats.json").read_text())["samples_written"] == 5


def test_resize_shrinks_to_the_shorter_side_and_keeps_small_images(flickr8k_dir, tmp_path):
    square = [photo(flickr8k_dir, i) for i in range(3)]
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo(flickr8k_dir, 3))).crop((0, 0, 128, 96)).save(buffer, format="JPEG")
    wide = buffer.getvalue()
    members = []
    for i, image in enumerate(square + [wide]):
        members += [(f"{i:03d}.jpg", image), (f"{i:03d}.txt", f"photo {i}".encode())]
    source = SourceConfig(path=str(write_tar(tmp_path / "in.tar", members)), format="webdataset")

    convert(source, str(tmp_path / "small"), ConvertOptions(resize=64))
    sizes = [Image.open(io.BytesIO(s.image)).size for s in read_back(tmp_path / "small", ".tar")]
    assert sizes == [(64, 64), (64, 64), (64, 64), (85, 64)]

    convert(source, str(tmp_path / "mid"), ConvertOptions(resize=100))
    samples = read_back(tmp_path / "mid", ".tar")
    assert [Image.open(io.BytesIO(s.image)).size for s in samples[:3]] == [(100, 100)] * 3
    assert samples[3].image == wide  # shorter side 96 < 100: kept as it was


def test_coco_captions_to_tar(flickr8k_dir, tmp_path):
    names = load_split(flickr8k_dir / "splits" / "train.txt")[:4]
    annotations = [{"id": 10 * i + j, "image_id": i, "caption": f"photo {i} caption {j}"}
                   for i in range(4) for j in range(2)]
    annotations.append({"id": 99, "image_id": 1234, "caption": "points at no image"})
    coco = {"images": [{"id": i, "file_name": name} for i, name in enumerate(names)], "annotations": annotations}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    source = SourceConfig(path=str(tmp_path), format="coco", captions_file="captions.json",
                          images_dir=str(flickr8k_dir / "images"))

    stats = convert(source, str(tmp_path / "out"), ConvertOptions(samples_per_shard=4))
    samples = read_back(tmp_path / "out", ".tar")
    assert stats["samples_written"] == 8 and stats["failures"] == {"missing_image": 1}
    assert [s.caption for s in samples] == [a["caption"] for a in annotations[:8]]
    assert samples[2].image == (flickr8k_dir / "images" / names[1]).read_bytes()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def test_cli_starts_its_own_ray_converts_and_shuts_it_down(flickr8k_dir, split60, flickr_expected, tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="crcli", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    try:
        done = subprocess.run(
            [sys.executable, "-m", "clip_ray.cli", "data", "convert", str(flickr8k_dir), str(tmp_path / "out"),
             "--input-format", "csv", "--split-file", str(split60), "--output-format", "parquet",
             "--samples-per-shard", "150", "--num-cpus", "2"],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "starting a local Ray cluster" in done.stderr
        assert json.loads(done.stdout)["samples_written"] == 300
        assert_same_samples(read_back(tmp_path / "out", ".parquet"), flickr_expected)
        deadline = time.time() + 10  # the job's cluster goes with it (its last processes may take a moment)
        while _processes_mentioning(ray_tmp) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_mentioning(ray_tmp) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
