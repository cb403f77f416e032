"""CLIP-style curation on a hand-checked caption set over real Flickr8k photos, on a real local Ray cluster."""

from __future__ import annotations

import io
import random
import tarfile
import time

import pytest

from clip_ray.config import SourceConfig
from clip_ray.data.formats import list_shards, load_split, read_shard
from clip_ray.data.offline.balance import cap_rank
from clip_ray.data.offline.curate import CurateOptions, curate
from clip_ray.data.offline.matching import QueryMatcher

QUERIES = ["cat", "red car", "dog", "T-shirt", "ice cream", "bird", "zebra", "Dog", ""]

# key: (caption, image: a photo index, or ("same as", key), or "corrupt"), with the expected fate in comments.
PAIRS = {
    # first input shard
    "s00": ("A cat sleeps on the sofa.", 0),  # cat
    "s01": ("The CAT, wet from the rain, looks angry", 1),  # cat: case and punctuation
    "s02": ("A category of vintage toys on a shelf", 2),  # no match: 'cat' inside a word
    "s03": ("Volunteers concatenate long strings of lights", 3),  # no match
    "s04": ("Two cats play with yarn in the hall", 4),  # no match: a plural is another word
    "s05": ("A red car parked near the beach", 5),  # red car
    "s06": ("A RED   car drives through town.", 6),  # red car: case and spacing
    "s07": ("A red, car-shaped balloon floats up", 7),  # no match: the comma splits the phrase
    "s08": ("A redcar sign hangs over the shop", 8),  # no match
    "s09": ("A brown dog runs on the grass", 9),  # dog (4 of these, cap 2)
    "s10": ("The dog's ball rolls into the pond", 10),  # dog
    "s11": ("A dog jumps over a fallen log", 11),  # dog
    "s12": ("Dog asleep by the warm fireplace", 12),  # dog
    "s13": ("A hotdog stand on a busy corner", 13),  # no match
    # second input shard
    "s14": ("A boy in a red t-shirt holds a cat", 14),  # T-shirt (2 matches) wins over cat (4): rarer
    "s15": ("Man wearing a T-Shirt and jeans", 15),  # T-shirt
    "s16": ("Kids eating ice cream in the sun", 16),  # ice cream
    "s17": ("Ice-cream cones melt on the table", 17),  # no match: 'ice - cream' is not 'ice cream'
    "s18": ("ice cream", 18),  # too short
    "s19": ("cat", 19),  # too short
    "s20": ("A very long caption about a cat that goes on and on and on without end", 20),  # too long
    "s21": ("Another cat photo from the same sofa", ("same as", "s00")),  # duplicate image
    "s22": ("Nothing to see in this picture", ("same as", "s05")),  # no match (before dedup is asked)
    "s23": ("A dog again in the same photo", ("same as", "s09")),  # duplicate image: not toward the cap
    "s24": ("A cat on a broken photo file", "corrupt"),  # corrupt image
    "s25": ("   ", 21),  # empty caption
    "s26": ("Ice cream truck parked by the red car", 22),  # ice cream (2) wins over red car (3)
    "s27": ("Bird's-eye view of a parking lot", 23),  # bird
}
ALWAYS_KEPT = {"s00": "cat", "s01": "cat", "s05": "red car", "s06": "red car", "s14": "T-shirt",
               "s15": "T-shirt", "s16": "ice cream", "s26": "ice cream", "s27": "bird"}
DOGS = ["s09", "s10", "s11", "s12"]


@pytest.fixture(scope="module")
def images(flickr8k_dir) -> dict[str, bytes]:
    names = load_split(flickr8k_dir / "splits" / "train.txt")[:24]
    photos = [(flickr8k_dir / "images" / name).read_bytes() for name in names]
    resolved = {}
    for key, (_, image) in PAIRS.items():
        if image == "corrupt":
            resolved[key] = b"\xff\xd8\xff\xe0" + random.Random(1).randbytes(3000)
        elif isinstance(image, tuple):
            resolved[key] = resolved[image[1]]
        else:
            resolved[key] = photos[image]
    return resolved


@pytest.fixture(scope="module")
def curated(ray_cluster, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    keys = list(PAIRS)
    for shard, part in (("a.tar", keys[:14]), ("b.tar", keys[14:])):
        with tarfile.open(root / shard, "w") as tar:
            for key in part:
                for name, data in ((f"{key}.jpg", images[key]), (f"{key}.txt", PAIRS[key][0].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "queries.txt").write_text("\n".join(QUERIES) + "\n")
    options = CurateOptions(max_per_query=2, seed=7, min_words=3, max_words=12, samples_per_shard=4)
    source = SourceConfig(path=str(root / "{a,b}.tar"), format="webdataset")
    report = curate(source, str(root / "queries.txt"), str(root / "out"), options)
    return report, root / "out"


def test_matcher_respects_word_boundaries_case_and_phrases():
    matcher = QueryMatcher(QUERIES)
    assert matcher.names == ["cat", "red car", "dog", "T-shirt", "ice cream", "bird", "zebra"]
    found = {key: [matcher.names[q] for q in matcher.match(caption)] for key, (caption, _) in PAIRS.items()}
    assert found["s00"] == found["s01"] == ["cat"]
    assert found["s02"] == found["s03"] == found["s04"] == found["s07"] == found["s13"] == found["s17"] == []
    assert found["s06"] == ["red car"] and found["s10"] == ["dog"] and found["s27"] == ["bird"]
    assert found["s14"] == ["cat", "T-shirt"] and found["s26"] == ["red car", "ice cream"]


def test_matcher_scales_to_half_a_million_queries():
    queries = [f"w{i}" if i % 2 else f"w{i} w{i % 977} w{i % 13}" for i in range(500_000)] + ["a small dog"]
    matcher = QueryMatcher(queries)
    assert len(matcher) == 500_001
    caption = "A small dog runs after " + " ".join(f"w{i}" for i in range(1, 31, 2))
    started = time.perf_counter()
    for _ in range(1000):
        found = matcher.match(caption)
    assert time.perf_counter() - started < 2.0  # 500k regexes per caption would take minutes
    assert [matcher.names[q] for q in found] == [f"w{i}" for i in range(1, 31, 2)] + ["a small dog"]


@pytest.mark.shared_data
def test_curation_report_counts_every_fate_exactly(curated):
    report, _ = curated
    assert report["pairs_seen"] == len(PAIRS) == 28
    assert report["dropped"] == {"no_query_match": 8, "too_short": 2, "too_long": 1, "duplicate_image": 2,
                                 "over_cap": 2, "corrupt_image": 1, "empty_caption": 1}
    assert report["kept"] == report["samples_written"] == 11
    # kept: on the query's own account (assigned to it, under the cap); kept_containing: s14 holds "cat" and
    # s26 "red car", both kept for a rarer query.
    assert report["queries"] == {
        "cat": {"matched": 4, "kept": 2, "kept_containing": 3},
        "red car": {"matched": 3, "kept": 2, "kept_containing": 3},
        "dog": {"matched": 5, "kept": 2, "kept_containing": 2},
        "T-shirt": {"matched": 2, "kept": 2, "kept_containing": 2},
        "ice cream": {"matched": 2, "kept": 2, "kept_containing": 2},
        "bird": {"matched": 1, "kept": 1, "kept_containing": 1},
    }
    assert report["num_queries"] == 7 and report["queries_matched"] == 6


@pytest.mark.shared_data
def test_curated_shards_hold_exactly_the_kept_pairs(curated, images):
    _, out = curated
    samples = [s for shard in list_shards(str(out)) for s in read_shard(shard)]
    # The cap keeps the dogs of lowest seeded rank; s09..s12 sit at positions 9..12 of partition 0.
    dogs = sorted(DOGS, key=lambda key: cap_rank(7, 0, int(key[1:])))[:2]
    expected = {**ALWAYS_KEPT, **{key: "dog" for key in dogs}}
    assert {s.key: s.meta["query"] for s in samples} == expected
    assert all(s.image == images[s.key] and s.caption == PAIRS[s.key][0] for s in samples)
    assert len(samples) == len({s.key for s in samples})
