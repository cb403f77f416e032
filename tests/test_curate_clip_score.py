"""The CLIP-score filter of curation, on Flickr8k photos (own and wrong captions) and a saved tiny model,
on a real local Ray cluster: each run's choice is checked against cosines computed here, in-process,
with the same model and preprocessing."""

from __future__ import annotations

import io
import json
import random
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from embed_helpers import make_workspace

from clip_ray.cli import main
from clip_ray.config import SourceConfig
from clip_ray.config.clip_score import ClipScoreConfig
from clip_ray.data.formats import Sample, list_shards, load_caption_csv, load_split, read_shard
from clip_ray.data.offline.balance import cap_rank
from clip_ray.data.offline.curate import CurateOptions
from clip_ray.data.offline.matching import QueryMatcher
from clip_ray.data.offline.score_filter import ScoreFilter, judge_scores, rank_scores, top_fraction_size
from clip_ray.data.stream.preprocess import Preprocessor, normalize
from clip_ray.driver.curate import curate_job
from clip_ray.inference.models import resolve_model

RAY_INIT_KWARGS = {"num_cpus": 3}
PER_SHARD = 14
SEED = 3


@pytest.fixture(scope="module")
def constructed(tmp_path_factory, flickr8k_dir, one_intra_op_thread):
    """40 photos, every fifth with another photo's caption, then a corrupt image and a too-short caption, in
    three tar shards of 14; the tiny model; each scoreable pair's cosine computed here. Pair i of the 42 is
    at (partition i // 14, position i % 14)."""
    root = tmp_path_factory.mktemp("clip_score")
    workspace = make_workspace(root, shards=1, per_shard=2)
    names = load_split(flickr8k_dir / "splits" / "train.txt")[:48]
    table = load_caption_csv(flickr8k_dir / "captions.csv")
    pairs: dict[str, tuple[bytes, str]] = {}
    for i in range(40):
        caption_of = names[40 + i // 5] if i % 5 == 4 else names[i]
        pairs[f"p{i:02d}"] = ((flickr8k_dir / "images" / names[i]).read_bytes(), table[caption_of][0][0])
    pairs["corrupt"] = (b"\xff\xd8\xff\xe0" + random.Random(1).randbytes(3000), "A dog on a photo that never was")
    pairs["short"] = ((flickr8k_dir / "images" / names[47]).read_bytes(), "two dogs")
    keys = list(pairs)
    for shard in range(3):
        with tarfile.open(root / f"{shard}.tar", "w") as tar:
            for key in keys[shard * PER_SHARD:(shard + 1) * PER_SHARD]:
                for name, data in ((f"{key}.jpg", pairs[key][0]), (f"{key}.txt", pairs[key][1].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    model = resolve_model(str(workspace.run_dir))
    config = model.model_config
    preprocessor = Preprocessor(config.vision.image_size, config.text.context_length, model.tokenizer, train=False,
                                uint8_images=True)
    scoreable = [key for key in keys if key.startswith("p")]
    samples = [Sample(key=key, image=pairs[key][0], caption=pairs[key][1]) for key in scoreable]
    pixels = np.stack([preprocessor.image(sample) for sample in samples]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        images = F.normalize(workspace.model.encode_image(torch.from_numpy(normalize(pixels))), dim=-1)
        texts = F.normalize(workspace.model.encode_text(torch.from_numpy(preprocessor.text(
            [sample.caption for sample in samples]))), dim=-1)
    scores = dict(zip(scoreable, (images * texts).sum(dim=-1).tolist()))
    places = {key: divmod(i, PER_SHARD) for i, key in enumerate(keys)}
    return {"root": root, "run_dir": workspace.run_dir, "pairs": pairs, "scores": scores, "places": places,
            "model": model}


def threshold_between(scores: list[float], low_rank: int, high_rank: int) -> float:
    """The midpoint of the widest gap between neighbouring scores (ascending ranks low_rank..high_rank)."""
    ordered = sorted(scores)
    gap, rank = max((ordered[r + 1] - ordered[r], r) for r in range(low_rank, high_rank))
    assert gap > 1e-4, "no clear gap: the run's float32 scores could fall either side"
    return (ordered[rank] + ordered[rank + 1]) / 2


def kept_samples(out) -> dict[str, Sample]:
    return {sample.key: sample for shard in list_shards(str(out)) for sample in read_shard(shard)}


def source(constructed) -> SourceConfig:
    return SourceConfig(path=str(constructed["root"] / "{0,1,2}.tar"), format="webdataset")


@pytest.fixture(scope="module")
def by_threshold(constructed, ray_cluster):
    """Score filter alone, images first decoded by the scorer (so it meets the corrupt one)."""
    threshold = threshold_between(list(constructed["scores"].values()), 12, 28)
    out = constructed["root"] / "by_threshold"
    options = CurateOptions(min_words=3, validate_images=False, samples_per_shard=PER_SHARD)
    clip = ClipScoreConfig(model=str(constructed["run_dir"]), min_score=threshold, batch_size=8)
    report = curate_job(source(constructed), None, str(out), options, clip, constructed["model"])
    return threshold, report, kept_samples(out)


@pytest.mark.shared_data
def test_threshold_keeps_exactly_the_pairs_at_or_above_it(by_threshold, constructed):
    threshold, report, kept = by_threshold
    scores = constructed["scores"]
    above = {key for key, score in scores.items() if score >= threshold}
    assert 0 < len(above) < len(scores)
    assert set(kept) == above
    assert report["dropped"]["low_clip_score"] == len(scores) - len(above)
    assert report["dropped"]["too_short"] == 1
    # Found by the scorer's decode (the scan did not decode): counted by its reason, never scored.
    assert sum(report["dropped"][reason] for reason in ("corrupt_image", "truncated_image")
               if reason in report["dropped"]) == 1
    assert report["kept"] == report["samples_written"] == len(above)
    assert report["pairs_seen"] == 42 == report["kept"] + sum(report["dropped"].values())


@pytest.mark.shared_data
def test_kept_pairs_carry_their_score_and_the_report_names_the_model(by_threshold, constructed):
    threshold, report, kept = by_threshold
    scores = constructed["scores"]
    for key, sample in kept.items():
        assert sample.meta["clip_score"] == pytest.approx(scores[key], abs=1e-5)
        assert sample.image == constructed["pairs"][key][0] and "query" not in sample.meta
    about = report["clip_score"]
    assert about["model"] == constructed["model"].identity() and about["scored"] == 40
    assert about["min_score"] == threshold and about["top_fraction"] is None
    quantiles = about["quantiles"]
    assert quantiles["min"] == pytest.approx(min(scores.values()), abs=1e-5)
    assert quantiles["max"] == pytest.approx(max(scores.values()), abs=1e-5)
    assert quantiles["p50"] == pytest.approx(sorted(scores.values())[round(0.5 * 39)], abs=1e-5)


@pytest.fixture(scope="module")
def by_top_fraction(constructed, ray_cluster):
    """Score filter alone, through the command line: the best 30%."""
    out = constructed["root"] / "by_top_fraction"
    status = main(["data", "curate", str(constructed["root"] / "{0,1,2}.tar"), str(out), "--min-words", "3",
                   "--samples-per-shard", str(PER_SHARD), "--clip-model", str(constructed["run_dir"]),
                   "--clip-top-fraction", "0.3", "--clip-batch-size", "16", "--clip-actors", "1"])
    return status, json.loads((out / "report.json").read_text()), kept_samples(out)


@pytest.mark.shared_data
def test_top_fraction_keeps_the_ceiling_of_f_times_scored_best_pairs(by_top_fraction, constructed):
    status, report, kept = by_top_fraction
    scores = constructed["scores"]
    size = top_fraction_size(0.3, 40)
    assert status == 0 and size == 12  # 0.3 x 40 is 12 exactly, not 12.000000000000002 rounded up
    best = sorted(scores, key=lambda key: -scores[key])[:size]
    assert set(kept) == set(best)
    about = report["clip_score"]
    assert about["top_fraction_kept"] == size and about["scored"] == 40
    assert about["top_fraction_threshold"] == pytest.approx(scores[best[-1]], abs=1e-5)
    assert report["dropped"] == {"low_clip_score": 40 - size, "too_short": 1, "corrupt_image": 1,
                                 "duplicate_image": 0}
    assert top_fraction_size(0.25, 10) == 3 and top_fraction_size(1.0, 7) == 7


@pytest.fixture(scope="module")
def with_queries_and_cap(constructed, ray_cluster):
    """Query "dog", at most 2 a query, and a threshold just above the score of one of the two dogs the cap's
    seeded order would keep first."""
    scores, places = constructed["scores"], constructed["places"]
    matcher = QueryMatcher(["dog"])
    dogs = [key for key in scores if matcher.match(constructed["pairs"][key][1])]
    by_cap = sorted(dogs, key=lambda key: cap_rank(SEED, *places[key]))
    loser = min(by_cap[:2], key=scores.get)
    higher = min(score for score in scores.values() if score > scores[loser])
    threshold = (scores[loser] + higher) / 2
    survivors = [key for key in by_cap if scores[key] >= threshold]
    assert len(survivors) >= 3 and loser not in survivors
    (constructed["root"] / "queries.txt").write_text("dog\n")
    out = constructed["root"] / "with_queries"
    options = CurateOptions(min_words=3, max_per_query=2, seed=SEED, samples_per_shard=PER_SHARD)
    clip = ClipScoreConfig(model=str(constructed["run_dir"]), min_score=threshold, batch_size=8)
    report = curate_job(source(constructed), str(constructed["root"] / "queries.txt"), str(out), options, clip,
                        constructed["model"])
    return {"dogs": dogs, "loser": loser, "survivors": survivors, "report": report, "kept": kept_samples(out)}


@pytest.mark.shared_data
def test_the_cap_chooses_among_pairs_that_passed_the_score(with_queries_and_cap):
    run = with_queries_and_cap
    report, kept = run["report"], run["kept"]
    # The loser had a slot by the cap's order alone; dropped by score, it leaves it to the next survivor.
    assert set(kept) == set(run["survivors"][:2]) and run["loser"] not in kept
    assert {sample.meta["query"] for sample in kept.values()} == {"dog"}
    dogs = len(run["dogs"])
    assert report["clip_score"]["scored"] == dogs  # only pairs that matched a query were scored
    assert report["dropped"] == {"no_query_match": 40 - dogs, "low_clip_score": dogs - len(run["survivors"]),
                                 "duplicate_image": 0, "over_cap": len(run["survivors"]) - 2, "too_short": 1,
                                 "corrupt_image": 1}
    assert report["queries"] == {"dog": {"matched": dogs, "kept": 2, "kept_containing": 2}}
    assert report["pairs_seen"] == 42 == report["kept"] + sum(report["dropped"].values())


def test_top_fraction_ties_go_to_the_earlier_pair_and_nan_never_passes(ray_cluster):
    import pyarrow as pa
    import ray

    places = [(1, 4), (0, 9), (1, 2), (0, 3), (2, 0), (0, 1), (0, 5)]
    scores = [0.5, 0.5, 0.5, 0.2, 0.9, None, float("nan")]
    drops = ["", "", "", "", "", "corrupt_image", ""]
    table = pa.table({"partition": pa.array([p for p, _ in places], pa.int32()),
                      "position": pa.array([q for _, q in places], pa.int32()),
                      "drop": drops, "score": pa.array(scores, pa.float32())})
    # 5 scored (a NaN is no score), ceil(0.5 x 5) = 3 kept: 0.9, then the two earliest of the three 0.5s.
    cut, report = rank_scores(ray.data.from_arrow(table), ScoreFilter(scorer=None, top_fraction=0.5))
    assert cut == (0.5, 1, 2) and report["scored"] == 5 and report["top_fraction_kept"] == 3
    assert report["quantiles"]["min"] == pytest.approx(0.2) and report["quantiles"]["max"] == pytest.approx(0.9)
    fates = judge_scores(table, None, cut)["drop"].to_pylist()
    assert fates == ["low_clip_score", "", "", "low_clip_score", "", "corrupt_image", "low_clip_score"]
    assert judge_scores(table, 0.5, None)["drop"].to_pylist() == ["", "", "", "low_clip_score", "",
                                                                  "corrupt_image", "low_clip_score"]


@pytest.mark.parametrize("flags, culprit", [
    (["--clip-model", "M", "--min-clip-score", "1.5"], "--min-clip-score=1.5"),
    (["--clip-model", "M", "--clip-top-fraction", "0"], "--clip-top-fraction=0.0"),
    (["--clip-model", "M", "--clip-top-fraction", "1.2"], "--clip-top-fraction=1.2"),
    (["--clip-model", "M"], "--min-clip-score=None: give a threshold or --clip-top-fraction"),
    (["--min-clip-score", "0.2"], "--clip-model=''"),
    (["--clip-model", "M", "--min-clip-score", "0.2", "--clip-actors", "0"], "--clip-actors=0"),
    ([], "--queries"),
])
def test_bad_filter_settings_are_one_line_naming_the_flag(flags, culprit, tmp_path, capsys):
    assert main(["data", "curate", str(tmp_path), str(tmp_path / "out"), *flags]) == 2
    assert culprit in capsys.readouterr().err


def test_a_model_that_cannot_be_resolved_is_named_before_ray_starts(tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    assert main(["data", "curate", str(tmp_path), str(tmp_path / "out"), "--clip-model", str(missing),
                 "--min-clip-score", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--clip-model" in err and str(missing) in err
