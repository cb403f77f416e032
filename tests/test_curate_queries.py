"""`clip-ray data queries`: the query list built from a constructed corpus, counts and PMI worked out by hand."""

from __future__ import annotations

import csv
import json
import math

import pytest

from clip_ray.cli import main
from clip_ray.config import SourceConfig
from clip_ray.data.formats import DataError, load_split
from clip_ray.data.offline.matching import QueryMatcher
from clip_ray.data.offline.queries import (
    QueryOptions, build_queries, count_corpus, default_min_word_count, select_queries,
)

RAY_INIT_KWARGS = {"num_cpus": 2, "log_to_driver": False}
pytestmark = pytest.mark.usefixtures("ray_cluster")

# Split over two text files and a CSV source, so the counts must be summed across inputs.
TEXT_A = ["red car", "red car", "", "the red car."]
TEXT_B = ["Red  CAR", "the sky", "the sky"]
SOURCE_CAPTIONS = ["blue sky, red", "The Sky"]
# Tokens per line (casefolded; punctuation breaks bigrams, "sky ," and ", red" are not word pairs):
#   red car x3 | the red car . | the sky x2 | blue sky , red | the sky
# Unigrams: red 3+1+1=5, car 3+1=4, the 1+2+1=4, sky 2+1+1=4, blue 1  -> N1 = 18
# Bigrams:  red car 4, the red 1, the sky 3, blue sky 1                -> N2 = 9
N1, N2 = 18, 9
WORDS = {"red": 5, "car": 4, "the": 4, "sky": 4, "blue": 1}
BIGRAMS = {"red car": 4, "the red": 1, "the sky": 3, "blue sky": 1}


def hand_pmi(bigram: str) -> float:
    first, second = bigram.split()
    return math.log((BIGRAMS[bigram] / N2) / ((WORDS[first] / N1) * (WORDS[second] / N1)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flickr8k_dir):
    root = tmp_path_factory.mktemp("queries")
    (root / "texts").mkdir()
    (root / "texts" / "a.txt").write_text("\n".join(TEXT_A) + "\n")
    (root / "texts" / "b.txt").write_text("\n".join(TEXT_B) + "\n")
    source = root / "source"
    (source / "images").mkdir(parents=True)
    names = load_split(flickr8k_dir / "splits" / "train.txt")[:2]
    for name in names:
        (source / "images" / name).write_bytes((flickr8k_dir / "images" / name).read_bytes())
    with open(source / "captions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "caption"])
        writer.writerows(zip(names, SOURCE_CAPTIONS))
        writer.writerow(["missing.jpg", "red car red car"])  # no image: skipped and counted, its words not
    extra = root / "titles.txt"
    extra.write_text("  New   York \nnew york\n\nO'Brien's Rock-n-Roll\n")
    metaclip = root / "metadata.json"
    metaclip.write_text(json.dumps(["Golden Gate", "red car"]))
    return {"texts": [str(root / "texts" / "*.txt")], "source": SourceConfig(path=str(source), format="csv"),
            "extra": [str(extra), str(metaclip)], "root": root}


def test_hand_worked_pmi_separates_the_rules():
    # The thresholds below are placed between these values.
    assert hand_pmi("red car") == pytest.approx(math.log(7.2))
    assert hand_pmi("the sky") == pytest.approx(math.log(6.75))
    assert hand_pmi("blue sky") == pytest.approx(math.log(9.0))
    assert hand_pmi("the red") == pytest.approx(math.log(1.8))


def test_words_and_bigrams_are_exactly_the_hand_counted_ones(corpus):
    options = QueryOptions(min_word_count=4, min_bigram_count=2, min_pmi=1.95)
    counted = count_corpus(corpus["texts"], corpus["source"], options)
    # Only what can pass a rule reaches the driver: counts >= 2, the lower threshold (blue: 1 stays behind).
    assert counted.words == {k: n for k, n in WORDS.items() if n >= 2} != WORDS
    assert counted.bigrams == {k: n for k, n in BIGRAMS.items() if n >= 2}
    queries, report = select_queries(counted, {}, options)
    # Words: count >= 4 (blue: 1). Bigrams: count >= 2 and PMI >= 1.95: red car (4, 1.974) passes; the sky
    # (3, 1.910) fails on PMI; blue sky (1, 2.197) fails on count despite the highest PMI; the red fails both.
    assert queries == ["car", "red", "red car", "sky", "the"]
    assert report["rules"] == {"words": 4, "bigrams": 1, "extra": {}}
    assert report["corpus"] == {"lines": 8, "words": N1, "distinct_words": 5, "bigrams": N2, "distinct_bigrams": 4,
                                "failed": {"missing_image": 1}}
    assert report["thresholds"] == {"min_word_count": 4, "min_word_count_scaled": False, "min_bigram_count": 2,
                                    "min_pmi": 1.95}

    lower_pmi, _ = select_queries(counted, {}, QueryOptions(min_word_count=5, min_bigram_count=3, min_pmi=1.9))
    assert lower_pmi == ["red", "red car", "the sky"]


def test_default_word_threshold_scales_the_papers_rule(corpus):
    assert default_min_word_count(3_000_000_000) == 100
    assert default_min_word_count(450_000_000) == 15
    assert default_min_word_count(N1) == 2
    queries, report = build_queries(corpus["texts"], options=QueryOptions(min_pmi=0.0))
    # Text files only: red 4, car 4, the 3, sky 2 (N1 = 13); bigrams red car 4, the red 1, the sky 2 (N2 = 7).
    assert report["thresholds"]["min_word_count"] == 2 and report["thresholds"]["min_word_count_scaled"]
    assert report["corpus"]["words"] == 13 and report["corpus"]["bigrams"] == 7
    assert queries == ["car", "red", "red car", "sky", "the", "the sky"]


def test_user_lists_are_normalised_as_the_matcher_tokenizes(corpus):
    queries, report = build_queries(extra_queries=corpus["extra"])
    assert queries == ["golden gate", "new york", "o ' brien ' s rock - n - roll", "red car"]
    assert report["rules"]["extra"] == {corpus["extra"][0]: 2, corpus["extra"][1]: 2}
    bad = corpus["root"] / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="bad.json"):
        build_queries(extra_queries=[str(bad)])
    with pytest.raises(DataError, match="nowhere.txt"):
        build_queries([str(corpus["root"] / "nowhere.txt")])


def test_cli_output_round_trips_through_the_matcher(corpus, capsys):
    output = corpus["root"] / "out" / "queries.txt"
    report_path = corpus["root"] / "out" / "report.json"
    status = main(["data", "queries", str(corpus["source"].path), "--input-format", "csv",
                   "--text", corpus["texts"][0], "--extra-queries", corpus["extra"][0], "--output", str(output),
                   "--report", str(report_path), "--min-word-count", "4", "--min-bigram-count", "2",
                   "--min-pmi", "1.95"])
    assert status == 0
    lines = output.read_text().splitlines()
    assert lines == ["car", "new york", "o ' brien ' s rock - n - roll", "red", "red car", "sky", "the"]
    report = json.loads(report_path.read_text())
    assert report["queries"] == 7 and report["rules"]["bigrams"] == 1 and report["output"] == str(output)
    matcher = QueryMatcher.from_file(str(output))
    assert matcher.names == lines
    found = {matcher.names[i] for i in matcher.match("A RED car parked near New-York... no, New York.")}
    assert found == {"red", "car", "red car", "new york"}
    assert "red car" not in {matcher.names[i] for i in matcher.match("red, car")}
    assert "o ' brien ' s rock - n - roll" in {matcher.names[i] for i in matcher.match("o'brien's rock-n-roll!")}

    assert main(["data", "queries", "--output", str(output), "--min-word-count", "0",
                 "--extra-queries", corpus["extra"][0]]) != 0
    assert "min_word_count" in capsys.readouterr().err
