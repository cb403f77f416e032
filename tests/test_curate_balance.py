"""MetaCLIP balancing and evaluation-overlap removal in curation, on Flickr8k photos and a real local Ray cluster.

60 pairs in three tar shards; their captions hold the queries below by construction, so each query's matched
count is known, and the pairs MetaCLIP's sampling keeps are worked out here from `draw_rank` itself. Two training
photos come from Flickr8k's test split and one more sits in a small ImageFolder: excluding those two evaluation
sets drops exactly those pairs as eval_overlap (the ones that match a query; a pair that matches none has
no_query_match first).
"""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from clip_ray.cli import main
from clip_ray.config import SourceConfig
from clip_ray.data.formats import list_shards, load_split, read_shard
from clip_ray.data.offline.balance import draw_rank
from clip_ray.data.offline.curate import CurateOptions, curate
from clip_ray.data.offline.overlap import EvalImages

RAY_INIT_KWARGS = {"num_cpus": 2}
PER_SHARD = 20
THRESHOLD = 4
SEED = 11
QUERIES = ["dog", "ball", "grass", "beach", "zebra"]
FROM_TEST_SPLIT = {8: 0, 50: 1}  # pair -> index into the test split's photos
IN_IMAGE_FOLDER = 3  # this pair's photo is also in the ImageFolder evaluation set


def words_of(i: int) -> list[str]:
    words = []
    if i < 30:
        words.append("dog")
    if i in (0, 1, 2):
        words.append("ball")
    if 25 <= i < 35:
        words.append("grass")
    if i in (40, 41):
        words.append("beach")
    return words


def caption(i: int) -> str:
    return " and a ".join(["A photo of a " + (words_of(i) or ["quiet street"])[0], *words_of(i)[1:]]) + f", {i}"


@pytest.fixture(scope="module")
def layout(tmp_path_factory, flickr8k_dir, ray_cluster):
    root = tmp_path_factory.mktemp("balance")
    train = load_split(flickr8k_dir / "splits" / "train.txt")[:71]
    test = load_split(flickr8k_dir / "splits" / "test.txt")
    photos = {i: (flickr8k_dir / "images" / (test[FROM_TEST_SPLIT[i]] if i in FROM_TEST_SPLIT else train[i]))
              .read_bytes() for i in range(60)}
    for shard in range(3):
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for i in range(shard * PER_SHARD, (shard + 1) * PER_SHARD):
                for name, data in ((f"p{i:02d}.jpg", photos[i]), (f"p{i:02d}.txt", caption(i).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    folder = root / "eval-folder"
    for class_name, photo in (("dogs", photos[IN_IMAGE_FOLDER]), ("other", (flickr8k_dir / "images" / train[70])
                                                                 .read_bytes())):
        (folder / class_name).mkdir(parents=True)
        (folder / class_name / "x.jpg").write_bytes(photo)
    (root / "queries.txt").write_text("\n".join(QUERIES) + "\n")
    return root


def expected_metaclip() -> tuple[dict[str, str], dict[str, dict]]:
    """({kept key: its query}, the report's per-query counts) worked out from draw_rank and the captions."""
    excluded = {IN_IMAGE_FOLDER, *(i for i in FROM_TEST_SPLIT if words_of(i))}
    pairs = [i for i in range(60) if words_of(i) and i not in excluded]
    matched = {q: sum(q in words_of(i) for i in pairs) for q in QUERIES}
    assert matched == {"dog": 28, "ball": 3, "grass": 10, "beach": 2, "zebra": 0}
    kept, counts = {}, {q: {"matched": n, "kept": 0, "kept_containing": 0} for q, n in matched.items() if n}
    for i in pairs:
        ids = {q: QUERIES.index(q) for q in words_of(i)}
        hits = [q for q in words_of(i)
                if draw_rank(SEED, i // PER_SHARD, i % PER_SHARD, ids[q]) * matched[q] < THRESHOLD << 64]
        for q in hits:
            counts[q]["kept"] += 1
        if hits:
            kept[f"p{i:02d}"] = min(hits, key=lambda q: (matched[q], ids[q]))
            for q in words_of(i):
                counts[q]["kept_containing"] += 1
    return kept, counts


def curated_queries(out) -> dict[str, str]:
    return {s.key: s.meta["query"] for shard in list_shards(str(out)) for s in read_shard(shard)}


@pytest.fixture(scope="module")
def one_worker(layout, flickr8k_dir):
    options = CurateOptions(max_per_query=THRESHOLD, balance="metaclip", seed=SEED, num_workers=1,
                            samples_per_shard=PER_SHARD, exclude_images=[
                                EvalImages(image_folder=str(layout / "eval-folder")),
                                EvalImages(source=SourceConfig(path=str(flickr8k_dir), format="csv",
                                                               split_file="splits/test.txt"))])
    source = SourceConfig(path=str(layout / "{0,1,2}.tar"), format="webdataset")
    return curate(source, str(layout / "queries.txt"), str(layout / "out-1"), options)


@pytest.mark.shared_data
def test_metaclip_keeps_the_drawn_pairs_and_counts_every_fate(one_worker, layout, flickr8k_dir):
    kept, counts = expected_metaclip()
    # Every query at or under t keeps all its pairs; dog's 28 are thinned to about t on its own account.
    assert all(counts[q]["kept"] == counts[q]["matched"] for q in ("ball", "beach"))
    assert 1 <= counts["dog"]["kept"] <= 10
    report = one_worker
    assert report["balance"] == "metaclip"
    assert report["queries"] == counts
    assert curated_queries(layout / "out-1") == kept
    assert report["kept"] == report["samples_written"] == len(kept)
    matching = 60 - 23  # pairs 35-39 and 42-59 match no query
    assert report["dropped"] == {"no_query_match": 23, "eval_overlap": 2, "duplicate_image": 0,
                                 "over_cap": matching - 2 - len(kept)}
    assert report["eval_overlap"]["images"] == 1000 + 2 and report["eval_overlap"]["failures"] == {}
    assert report["eval_overlap"]["sets"] == [f"imagefolder:{layout / 'eval-folder'}", f"csv:{flickr8k_dir}"]
    assert report["eval_overlap"]["exact"] == 2
    assert not (layout / "out-1" / "_selection").exists()  # the hand-over files are gone


@pytest.mark.shared_data
def test_two_workers_and_the_cli_choose_the_same_pairs_and_a_rerun_reuses_them(one_worker, layout, flickr8k_dir):
    args = ["data", "curate", str(layout / "{0,1,2}.tar"), str(layout / "out-2"), "--queries",
            str(layout / "queries.txt"), "--balance", "metaclip", "--max-per-query", str(THRESHOLD), "--seed",
            str(SEED), "--num-workers", "2", "--samples-per-shard", str(PER_SHARD),
            "--exclude-images", f"imagefolder:{layout / 'eval-folder'}",
            "--exclude-images", f"csv:{flickr8k_dir},split_file=splits/test.txt"]
    assert main(args) == 0
    assert curated_queries(layout / "out-2") == curated_queries(layout / "out-1")
    assert main(args) == 0
    report = json.loads((layout / "out-2" / "report.json").read_text())
    assert report["partitions_reused"] == report["partitions"] == 3
    assert report["queries"] == one_worker["queries"] and report["dropped"] == one_worker["dropped"]


def test_a_malformed_exclude_images_value_is_refused_before_ray_starts(tmp_path, capsys):
    for spec, culprit in (("flickr:/data", "FORMAT"), ("csv:/data,splits=test.txt", "'splits=test.txt'"),
                          ("imagefolder:/data,split_file=x", "imagefolder takes none")):
        assert main(["data", "curate", str(tmp_path / "x.tar"), str(tmp_path / "out"), "--queries", "q.txt",
                     "--exclude-images", spec]) == 2
        assert culprit in capsys.readouterr().err
