"""Every kind of bad input is skipped, counted under its own reason, and never stops a read."""

from __future__ import annotations

import random
import struct
import tarfile
import warnings
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tar_helpers import write_tar

from clip_ray.data.formats import (
    BadSample, DataError, FailureCounts, FailureReason, ParquetWriter, ShardWriter, check_failure_rate, decode_caption,
    decode_image, decode_samples, load_split, read_caption_csv, read_coco_captions, read_image_folder,
    read_parquet_file, read_tar_shard,
)

pytestmark = pytest.mark.shared_data
R = FailureReason


def png_declaring(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims width x height: a decompression bomb's signature."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photos(flickr8k_dir: Path) -> list[bytes]:
    names = load_split(flickr8k_dir / "splits" / "train.txt")[:6]
    return [(flickr8k_dir / "images" / name).read_bytes() for name in names]


@pytest.fixture(scope="module")
def bad_images(photos) -> dict[str, bytes]:
    return {
        "corrupt": b"\xff\xd8\xff\xe0" + random.Random(0).randbytes(4000),  # a JPEG header, then noise
        "truncated": photos[3][: len(photos[3]) // 2],
        "zero_byte": b"",
        "text": b"<html><body>404 Not Found</body></html>\n",
        "bomb": png_declaring(20_000, 20_000),
    }


@pytest.fixture()
def bad_shard(tmp_path, photos, bad_images) -> Path:
    members = []
    for i in range(3):
        members += [(f"good{i}.jpg", photos[i]), (f"good{i}.txt", f"good photo {i}\n".encode())]
    for name, data in bad_images.items():
        members += [(f"{name}.jpg", data), (f"{name}.txt", f"caption of {name}".encode())]
    members += [("empty_caption.jpg", photos[4]), ("empty_caption.txt", b"  \n")]
    members += [("latin1.jpg", photos[5]), ("latin1.txt", "caf\xe9 au lait".encode("latin-1"))]
    members += [("no_caption.jpg", photos[0]), ("no_caption.json", b'{"url": "x"}')]
    members += [("no_image.txt", b"a caption whose image never arrived")]
    path = tmp_path / "bad.tar"
    write_tar(path, members)
    return path


def test_each_bad_sample_is_counted_once_under_its_reason(bad_shard):
    read_counts = FailureCounts()
    samples = list(read_tar_shard(bad_shard, read_counts))
    assert [s.key for s in samples] == ["good0", "good1", "good2", "corrupt", "truncated", "text", "bomb"]
    assert read_counts.ok == 7
    assert read_counts.failed == {"zero_byte_image": 1, "empty_caption": 1, "non_utf8_caption": 1,
                                  "missing_caption": 1, "missing_image": 1}

    decode_counts = FailureCounts()
    decoded = list(decode_samples(samples, decode_counts, max_pixels=10_000_000))
    assert [s.key for s, _ in decoded] == ["good0", "good1", "good2"]
    assert all(image.mode == "RGB" and image.size == (128, 128) for _, image in decoded)
    assert [s.caption for s, _ in decoded] == ["good photo 0", "good photo 1", "good photo 2"]
    assert decode_counts.ok == 3
    assert decode_counts.failed == {"corrupt_image": 1, "truncated_image": 1, "not_an_image": 1, "image_too_large": 1}

    total = read_counts.followed_by(decode_counts)
    assert total.ok == 3 and total.num_failed == 9
    assert {reason: total[reason] for reason in R if reason != R.UNREADABLE_SHARD} == {
        reason: 1 for reason in R if reason != R.UNREADABLE_SHARD}
    assert any(str(bad_shard) in message for message in total.examples["missing_image"])
    assert FailureCounts.from_dict(total.to_dict()) == total
    assert total.as_metrics()["data/ok"] == 3 and total.as_metrics()["data/unreadable_shard"] == 0


def test_broken_metadata_keeps_the_pair(tmp_path, photos):
    write_tar(tmp_path / "meta.tar", [("a.jpg", photos[0]), ("a.txt", b"x"), ("a.json", b"{not json"),
                                      ("b.jpg", photos[1]), ("b.txt", b"y"), ("b.json", b"[1, 2]")])
    counts = FailureCounts()
    samples = list(read_tar_shard(tmp_path / "meta.tar", counts))
    assert counts.ok == 2 and counts.num_failed == 0
    assert list(samples[0].meta) == ["json_error"] and samples[1].meta == {"json": [1, 2]}


def test_unreadable_shards_are_counted_and_do_not_stop_the_read(tmp_path, photos, caplog):
    shards = []
    with ShardWriter(tmp_path, samples_per_shard=4) as writer:
        for i in range(4):
            writer.write(f"{i:03d}", photos[i], f"caption {i}")
    whole = Path(writer.close()[0])
    with tarfile.open(whole) as tar:
        cut = tar.getmember("002.jpg").offset_data + 100  # inside the third sample's image
    (tmp_path / "truncated.tar").write_bytes(whole.read_bytes()[:cut])
    (tmp_path / "noise.tar").write_bytes(random.Random(1).randbytes(5000))
    (tmp_path / "empty.tar").write_bytes(b"")
    shards = [tmp_path / "truncated.tar", tmp_path / "noise.tar", tmp_path / "empty.tar",
              tmp_path / "does-not-exist.tar", tmp_path, whole]

    counts = FailureCounts()
    keys = [s.key for shard in shards for s in read_tar_shard(shard, counts)]
    assert keys == ["000", "001"] + ["000", "001", "002", "003"]
    assert counts.ok == 6 and counts.failed == {"unreadable_shard": 5}
    assert len(counts.examples["unreadable_shard"]) == 3  # examples are capped; the log has every lost shard
    lost = [r.getMessage() for r in caplog.records if "unreadable_shard" in r.getMessage()]
    assert len(lost) == 5 and "does-not-exist.tar: FileNotFoundError" in lost[3]


def test_bad_parquet_files_and_rows(tmp_path, photos):
    with ParquetWriter(tmp_path / "good.parquet", rows_per_group=2) as writer:
        for i in range(5):
            writer.write(f"k{i}", photos[i], f"caption {i}")
    good = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.parquet").write_bytes(random.Random(2).randbytes(3000))
    pq.write_table(pa.table({"image": [photos[0]]}), tmp_path / "no_caption_column.parquet")
    rows = {"image": [photos[0], None, b"", photos[1], photos[2], photos[3]],
            "caption": ["fine", "no image", "zero bytes", None, " ", "caf\xe9".encode("latin-1")]}
    pq.write_table(pa.table(rows, schema=pa.schema([("image", pa.binary()), ("caption", pa.binary())])),
                   tmp_path / "bad_rows.parquet")

    counts = FailureCounts()
    files = ["good", "truncated", "noise", "no_caption_column", "bad_rows", "missing"]
    keys = [s.key for name in files for s in read_parquet_file(tmp_path / f"{name}.parquet", counts)]
    assert keys == ["k0", "k1", "k2", "k3", "k4", "bad_rows_0"]
    assert counts.ok == 6
    assert counts.failed == {"unreadable_shard": 4, "missing_image": 1, "zero_byte_image": 1,
                             "missing_caption": 1, "empty_caption": 1, "non_utf8_caption": 1}


def test_bad_folder_csv_coco_and_image_folder_inputs(tmp_path, photos):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(photos[0])
    (images / "b.jpg").write_bytes(photos[1])
    (images / "empty.jpg").write_bytes(b"")
    csv_bytes = ("image,caption\n"
                 "a.jpg,a dog runs\na.jpg,\"a dog, running\"\na.jpg,   \n"
                 "b.jpg,a cat\nb.jpg,").encode() + "caf\xe9\n".encode("latin-1") + (
                 "gone.jpg,never downloaded\ngone.jpg,still gone\n"
                 "empty.jpg,zero bytes\n").encode()
    (tmp_path / "captions.csv").write_bytes(csv_bytes)
    (tmp_path / "split.txt").write_text("b.jpg\na.jpg\nuncaptioned.jpg\ngone.jpg\nempty.jpg\n")

    counts = FailureCounts()
    samples = list(read_caption_csv(tmp_path, counts, split_file="split.txt"))
    assert [(s.key, s.caption) for s in samples] == [("b_0", "a cat"), ("a_0", "a dog runs"), ("a_1", "a dog, running")]
    assert counts.ok == 3
    assert counts.failed == {"non_utf8_caption": 1, "empty_caption": 1, "missing_caption": 1,
                             "missing_image": 2, "zero_byte_image": 1}

    unreadable = FailureCounts()
    assert list(read_caption_csv(tmp_path / "nowhere", unreadable)) == []
    (tmp_path / "wrong.csv").write_text("file,text\na.jpg,x\n")
    assert list(read_caption_csv(tmp_path, unreadable, captions_file="wrong.csv")) == []
    assert unreadable.failed == {"unreadable_shard": 2}

    coco = ('{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}], '
            '"annotations": [{"id": 5, "image_id": 1, "caption": "a dog"}, {"id": 6, "image_id": 9, "caption": "?"},'
            ' {"id": 7, "image_id": 1, "caption": ""}]}')
    (tmp_path / "coco.json").write_text(coco)
    (tmp_path / "broken.json").write_text(coco[:50])
    counts = FailureCounts()
    samples = list(read_coco_captions(tmp_path / "coco.json", images, counts))
    samples += read_coco_captions(tmp_path / "broken.json", images, counts)
    assert [s.caption for s in samples] == ["a dog"]
    assert counts.failed == {"missing_image": 1, "empty_caption": 1, "missing_caption": 1, "unreadable_shard": 1}

    for name, data in (("cat/1.jpg", photos[0]), ("cat/2.jpg", b""), ("dog/1.png", photos[1]), ("dog/notes.txt", b"x")):
        (tmp_path / "folder" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / name).write_bytes(data)
    counts = FailureCounts()
    items = list(read_image_folder(tmp_path / "folder", counts))
    items += read_image_folder(tmp_path / "no-such-folder", counts)
    assert [(x.key, x.class_index, x.class_name) for x in items] == [("cat/1", 0, "cat"), ("dog/1", 1, "dog")]
    assert counts.ok == 2 and counts.failed == {"zero_byte_image": 1, "unreadable_shard": 1}


def test_decode_image_reasons_and_pixel_limit(photos, bad_images):
    assert decode_image(photos[0], max_pixels=128 * 128).size == (128, 128)
    assert decode_image(photos[0], draft_size=32).size == (32, 32)  # JPEG decoded at 1/4 scale
    with pytest.raises(BadSample) as err:
        decode_image(photos[0], max_pixels=128 * 128 - 1)
    assert err.value.reason == R.IMAGE_TOO_LARGE and "128x128" in err.value.detail
    expected = {"corrupt": R.CORRUPT_IMAGE, "truncated": R.TRUNCATED_IMAGE, "zero_byte": R.ZERO_BYTE_IMAGE,
                "text": R.NOT_AN_IMAGE, "bomb": R.IMAGE_TOO_LARGE}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        for name, data in bad_images.items():
            with pytest.raises(BadSample) as err:
                decode_image(data, max_pixels=10_000_000)
            assert err.value.reason == expected[name], name
        with pytest.raises(BadSample) as err:  # under PIL's own error limit, over its warning limit
            decode_image(png_declaring(10_000, 10_000), max_pixels=10_000_000)
        assert err.value.reason == R.IMAGE_TOO_LARGE and "10000x10000" in err.value.detail


def test_decode_caption():
    assert decode_caption("  A dog .\n".encode()) == "A dog ."
    assert decode_caption("\ufeffun café".encode()) == "un café"
    for raw, reason in ((b"", R.EMPTY_CAPTION), (b" \t\n", R.EMPTY_CAPTION), (b"caf\xe9", R.NON_UTF8_CAPTION)):
        with pytest.raises(BadSample) as err:
            decode_caption(raw)
        assert err.value.reason == reason


def test_check_failure_rate_names_the_source(caplog):
    counts = FailureCounts(ok=90)
    for _ in range(10):
        counts.reject(R.CORRUPT_IMAGE, "s3://bucket/shards/00007.tar", "k", "bad")
    assert len(caplog.records) == 3 and "s3://bucket/shards/00007.tar:k: bad" in caplog.records[0].getMessage()
    check_failure_rate(counts, max_fraction=0.10, source="laion-part-7")  # exactly 10% is allowed
    counts.reject(R.MISSING_CAPTION, "s3://bucket/shards/00007.tar", "k2")
    with pytest.raises(DataError, match=r"'laion-part-7'.*more than the allowed 10\.0%.*corrupt_image=10"):
        check_failure_rate(counts, max_fraction=0.10, source="laion-part-7")
    with pytest.raises(DataError, match="'empty-source' yielded no usable sample"):
        check_failure_rate(FailureCounts(), max_fraction=1.0, source="empty-source")
    all_bad = FailureCounts()
    all_bad.reject(R.UNREADABLE_SHARD, "x.tar")
    with pytest.raises(DataError, match="'x' yielded no usable sample: every item failed"):
        check_failure_rate(all_bad, max_fraction=1.0, source="x")
    merged = FailureCounts(ok=1) + all_bad
    assert merged.ok == 1 and merged[R.UNREADABLE_SHARD] == 1 and all_bad.ok == 0
