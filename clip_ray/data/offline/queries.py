"""Builds a curation query list from text, as CLIP built its 500,000 queries.

CLIP's list was every word occurring at least 100 times in English Wikipedia,
bigrams with high pointwise mutual information, article titles and WordNet
synsets. This builds the same from text the user has: plain text files (one
document or caption per line) and/or the captions of any source clip-ray
reads, streamed on Ray Data, plus lists the user supplies.

Text is tokenized exactly as curation's QueryMatcher tokenizes it
(clip_ray.data.offline.matching.tokenize: casefolded, `\\w+` words and single
punctuation marks). Only word tokens are counted: a unigram is a word token,
a bigram two word tokens next to each other in the token sequence of one line
(so "red, car" holds no bigram, just as the matcher never matches "red car"
there). With c(.) the counts over the corpus, N1 the total of unigram counts
and N2 the total of bigram counts:

    p(a) = c(a) / N1,    p(ab) = c(ab) / N2,
    PMI(a b) = ln( p(ab) / (p(a) * p(b)) )    (natural log)

The rules:
- words: c(a) >= min_word_count. The paper's rule is >= 100 occurrences in
  English Wikipedia (~3B words); scaled to this corpus the default is
  max(2, round(100 * N1 / 3e9));
- bigrams: c(ab) >= min_bigram_count (default: the word threshold) and
  PMI(a b) >= min_pmi (default 3.0: the pair occurs ~20x more often than chance);
- extra lists: files of one query per line (titles, synsets), or a JSON list of
  strings (a MetaCLIP metadata.json); each query is tokenized and its tokens
  joined by single spaces, so it matches as the matcher will match it.

Each block of text is counted by one Ray Data task; the partial counts are
summed by a groupby on the n-gram. The driver reads the totals first (one row
per block), which fix the thresholds, then only the words and bigrams whose
count reaches the lower threshold (a word under the bigram threshold is in no
bigram over it, so PMI never needs it). Neither the text nor the long tail of
rare n-grams reaches the driver.

Output: the queries, sorted and deduplicated, one per line (what
`QueryMatcher.from_file` reads), and a report: queries per rule, the corpus
totals and the thresholds used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from clip_ray.config import SourceConfig
from clip_ray.data.formats import DataError, FailureCounts
from clip_ray.data.offline.matching import tokenize
from clip_ray.data.offline.partitions import Partition, plan_partitions, read_partition, write_json
from clip_ray.ray_session import cluster_cpus, connect_ray
from clip_ray.storage import list_shards, resolve, write_file

# The paper: words occurring >= 100 times in English Wikipedia, about 3B words.
PAPER_MIN_COUNT = 100
PAPER_CORPUS_WORDS = 3e9
DEFAULT_MIN_PMI = 3.0

COUNTS_SCHEMA = pa.schema([("gram", pa.string()), ("count", pa.int64())])
# Bookkeeping rows among the n-gram counts: a tab never occurs in a gram (tokens hold no whitespace).
LINES_KEY = "\tlines"
FAILED_PREFIX = "\tfailed:"

_WORD = re.compile(r"\w")


def default_min_word_count(corpus_words: int) -> int:
    """The paper's >= 100 in ~3B words, scaled to `corpus_words`, never below 2."""
    return max(2, round(PAPER_MIN_COUNT * corpus_words / PAPER_CORPUS_WORDS))


def pmi(pair_count: int, first_count: int, second_count: int, unigram_total: int, bigram_total: int) -> float:
    """ln(p(ab) / (p(a) p(b))) with p(ab) = c(ab)/N2 and p(x) = c(x)/N1."""
    return math.log((pair_count / bigram_total) / ((first_count / unigram_total) * (second_count / unigram_total)))


def normalise(query: str) -> str:
    """A query as the matcher sees it: its tokens joined by single spaces ('' for none)."""
    return " ".join(tokenize(query))


def count_line(text: str, counts: Counter) -> None:
    """Adds one line's unigrams and adjacent word bigrams to `counts` (see the module docstring)."""
    tokens = tokenize(text)
    words = [_WORD.match(token) is not None for token in tokens]
    counts.update(token for token, is_word in zip(tokens, words) if is_word)
    counts.update(f"{tokens[i]} {tokens[i + 1]}" for i in range(len(tokens) - 1) if words[i] and words[i + 1])
    counts[LINES_KEY] += 1


def _counts_table(counts: Counter) -> pa.Table:
    return pa.table({"gram": list(counts), "count": list(counts.values())}, schema=COUNTS_SCHEMA)


def _count_text_batch(batch: pa.Table) -> pa.Table:
    counts: Counter = Counter()
    for line in batch.column("text").to_pylist():
        count_line(line, counts)
    return _counts_table(counts)


def _count_partition_batch(batch: pa.Table, source: SourceConfig) -> pa.Table:
    counts: Counter = Counter()
    for text in batch.column("partition").to_pylist():
        failures = FailureCounts()
        for sample in read_partition(Partition(**json.loads(text)), source, failures):
            count_line(sample.caption, counts)
        counts.update({FAILED_PREFIX + reason: n for reason, n in failures.failed.items()})
    return _counts_table(counts)


# --------------------------------------------------------------------------- inputs


def text_files(patterns: Sequence[str]) -> list[str]:
    """Text file paths from paths, globs and folders (a folder: its .txt files); a missing one is a DataError."""
    paths = list_shards(list(patterns), (".txt",))
    for path in paths:
        fs, inner = resolve(path)
        if fs.get_file_info(inner).type != pafs.FileType.File:
            raise DataError(f"text file {path!r} does not exist")
    if patterns and not paths:
        raise DataError(f"no text files match {list(patterns)}")
    return paths


def read_extra_queries(path: str) -> list[str]:
    """A user list, normalised: one query per line, or a JSON list of strings (MetaCLIP's metadata.json)."""
    fs, inner = resolve(path)
    try:
        with fs.open_input_stream(inner) as stream:
            text = stream.read().decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"extra queries {path!r}: {err}") from None
    if path.endswith(".json"):
        try:
            entries = json.loads(text)
        except ValueError as err:
            raise DataError(f"extra queries {path!r}: not JSON ({err})") from None
        if not isinstance(entries, list) or not all(isinstance(entry, str) for entry in entries):
            raise DataError(f"extra queries {path!r}: expected a JSON list of strings")
    else:
        entries = text.splitlines()
    return [query for query in map(normalise, entries) if query]


def count_datasets(texts: Sequence[str], source: SourceConfig | None,
                   samples_per_partition: int) -> tuple[list[ray.data.Dataset], FailureCounts]:
    """One partial-count dataset per input (text files, the source's captions) and the source's planning failures."""
    planning = FailureCounts()
    datasets = []
    if texts:
        datasets.append(ray.data.read_text(text_files(texts)).map_batches(_count_text_batch, batch_format="pyarrow"))
    if source is not None:
        partitions = plan_partitions(source, samples_per_partition, planning)
        if not partitions:
            raise DataError(f"data source {source.path!r} has no captions to read ({planning.summary()})")
        items = [{"partition": json.dumps(dataclasses.asdict(p))} for p in partitions]
        datasets.append(ray.data.from_items(items, override_num_blocks=len(items))
                        .map_batches(_count_partition_batch, batch_size=1, batch_format="pyarrow",
                                     fn_kwargs={"source": source}))
    return datasets, planning


# --------------------------------------------------------------------------- the rules


@dataclass
class CorpusCounts:
    """What the driver keeps: the totals, and the counts of the words and bigrams that can pass a rule (count at
    least the lower of the two thresholds)."""

    words: dict[str, int] = dataclasses.field(default_factory=dict)
    bigrams: dict[str, int] = dataclasses.field(default_factory=dict)
    word_total: int = 0
    bigram_total: int = 0
    distinct_words: int = 0
    distinct_bigrams: int = 0
    lines: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)


def _block_totals(batch: pa.Table) -> pa.Table:
    """One row per block: the unigram and bigram totals and distinct counts, and the lines and failures rows."""
    grams, counts = batch["gram"].to_pylist(), batch["sum(count)"].to_pylist()
    totals = Counter()
    special = []
    for gram, count in zip(grams, counts):
        if gram == LINES_KEY or gram.startswith(FAILED_PREFIX):
            special.append(f"{gram}={count}")
        else:
            kind = "bigram" if " " in gram else "word"
            totals[kind] += count
            totals[f"distinct_{kind}"] += 1
    return pa.table({"totals": [json.dumps(totals)], "special": [special]})


def _at_least(batch: pa.Table, floor: int) -> pa.Table:
    keep = [count >= floor and not gram.startswith("\t")
            for gram, count in zip(batch["gram"].to_pylist(), batch["sum(count)"].to_pylist())]
    return batch.filter(pa.array(keep, pa.bool_()))


def sum_counts(partials: Sequence[ray.data.Dataset], options: QueryOptions, shuffle_partitions: int) -> CorpusCounts:
    """Sums the partial counts of all inputs by one Ray Data groupby. The driver gets the totals (one row per
    block), then only the n-grams that can pass a rule: a word under the bigram threshold is in no bigram over it."""
    corpus = CorpusCounts()
    counts = partials[0].union(*partials[1:]) if len(partials) > 1 else partials[0]
    summed = counts.groupby("gram", num_partitions=shuffle_partitions).sum("count").materialize()
    for row in summed.map_batches(_block_totals, batch_size=None, batch_format="pyarrow").take_all():
        totals = json.loads(row["totals"])
        corpus.word_total += totals.get("word", 0)
        corpus.bigram_total += totals.get("bigram", 0)
        corpus.distinct_words += totals.get("distinct_word", 0)
        corpus.distinct_bigrams += totals.get("distinct_bigram", 0)
        for entry in row["special"]:
            gram, count = entry.rsplit("=", 1)
            if gram == LINES_KEY:
                corpus.lines = int(count)
            else:
                corpus.failed[gram[len(FAILED_PREFIX):]] = int(count)
    min_words, min_bigrams = thresholds(options, corpus.word_total)
    wanted = summed.map_batches(_at_least, fn_kwargs={"floor": min(min_words, min_bigrams)}, batch_format="pyarrow")
    for batch in wanted.iter_batches(batch_format="pyarrow"):
        for gram, count in zip(batch["gram"].to_pylist(), batch["sum(count)"].to_pylist()):
            (corpus.bigrams if " " in gram else corpus.words)[gram] = count
    return corpus


def select_words(corpus: CorpusCounts, min_count: int) -> list[str]:
    return sorted(word for word, count in corpus.words.items() if count >= min_count)


def select_bigrams(corpus: CorpusCounts, min_count: int, min_pmi: float) -> list[str]:
    chosen = []
    for bigram, count in corpus.bigrams.items():
        first, second = bigram.split(" ")
        if count >= min_count and pmi(count, corpus.words[first], corpus.words[second], corpus.word_total,
                                      corpus.bigram_total) >= min_pmi:
            chosen.append(bigram)
    return sorted(chosen)


@dataclass
class QueryOptions:
    # None: scaled from the paper's rule (see default_min_word_count).
    min_word_count: int | None = None
    # None: the word threshold.
    min_bigram_count: int | None = None
    min_pmi: float = DEFAULT_MIN_PMI
    # Captions per task when reading a source.
    samples_per_partition: int = 1000
    # Partitions of the groupby that sums the counts (None: the cluster's CPUs).
    shuffle_partitions: int | None = None

    def validate(self) -> None:
        for name in ("min_word_count", "min_bigram_count"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not math.isfinite(self.min_pmi):
            raise ValueError(f"min_pmi must be a finite number, got {self.min_pmi}")
        if self.shuffle_partitions is not None and self.shuffle_partitions < 1:
            raise ValueError(f"shuffle_partitions must be >= 1, got {self.shuffle_partitions}")
        if self.samples_per_partition < 1:
            raise ValueError(f"samples_per_partition must be >= 1, got {self.samples_per_partition}")


def thresholds(options: QueryOptions, word_total: int) -> tuple[int, int]:
    """(min word count, min bigram count): as given, else the paper's rule scaled to the corpus, and the word one."""
    min_words = options.min_word_count or default_min_word_count(word_total)
    return min_words, options.min_bigram_count or min_words


def count_corpus(texts: Sequence[str], source: SourceConfig | None, options: QueryOptions) -> CorpusCounts:
    """The corpus counts of the text files and the source's captions, on the connected (or a new) Ray cluster;
    n-grams under both thresholds stay on the cluster."""
    connect_ray()
    partials, planning = count_datasets(texts, source, options.samples_per_partition)
    corpus = sum_counts(partials, options, options.shuffle_partitions or cluster_cpus())
    for reason, n in planning.failed.items():
        corpus.failed[reason] = corpus.failed.get(reason, 0) + n
    return corpus


def select_queries(corpus: CorpusCounts, extra: dict[str, list[str]], options: QueryOptions) -> tuple[list[str], dict]:
    """(the queries, sorted and deduplicated; the report's rules, corpus and thresholds) by the three rules."""
    min_words, min_bigrams = thresholds(options, corpus.word_total)
    words = select_words(corpus, min_words)
    bigrams = select_bigrams(corpus, min_bigrams, options.min_pmi)
    queries = sorted(set(words) | set(bigrams) | {query for listed in extra.values() for query in listed})
    report = {
        "queries": len(queries),
        "rules": {"words": len(words), "bigrams": len(bigrams),
                  "extra": {path: len(set(listed)) for path, listed in extra.items()}},
        "corpus": {"lines": corpus.lines, "words": corpus.word_total, "distinct_words": corpus.distinct_words,
                   "bigrams": corpus.bigram_total, "distinct_bigrams": corpus.distinct_bigrams,
                   "failed": dict(sorted(corpus.failed.items()))},
        "thresholds": {"min_word_count": min_words, "min_word_count_scaled": options.min_word_count is None,
                       "min_bigram_count": min_bigrams, "min_pmi": options.min_pmi},
    }
    return queries, report


def build_queries(texts: Sequence[str] = (), source: SourceConfig | None = None,
                  extra_queries: Sequence[str] = (), options: QueryOptions | None = None) -> tuple[list[str], dict]:
    """(the queries, sorted and deduplicated; the report) from the inputs (see the module docstring).

    Uses the Ray cluster this process is connected to, or connects as `connect_ray` does (only with text or a
    source to count).
    """
    options = options or QueryOptions()
    options.validate()
    if source is not None:
        source.validate("source")
    if not texts and source is None and not extra_queries:
        raise ValueError("building queries needs text files, a source or extra query lists")
    extra = {path: read_extra_queries(path) for path in extra_queries}
    corpus = count_corpus(texts, source, options) if texts or source is not None else CorpusCounts()
    queries, report = select_queries(corpus, extra, options)
    report["inputs"] = {"texts": list(texts), "source": dataclasses.asdict(source) if source is not None else None,
                        "extra_queries": list(extra_queries)}
    return queries, report


def write_queries(queries: Iterator[str] | Sequence[str], path: str) -> None:
    """One query per line, whole or not at all."""
    write_file(path, "".join(f"{query}\n" for query in queries).encode("utf-8"))


def queries_job(texts: Sequence[str], source: SourceConfig | None, extra_queries: Sequence[str], output: str,
                report_path: str | None = None, options: QueryOptions | None = None) -> dict:
    """Builds the queries, writes them to `output` (and the report to `report_path`); returns the report."""
    queries, report = build_queries(texts, source, extra_queries, options)
    if not queries:
        raise DataError(f"no queries: no word or bigram passes the thresholds {report['thresholds']} and no "
                        "extra list holds any")
    write_queries(queries, output)
    report["output"] = str(output)
    if report_path is not None:
        fs, inner = resolve(report_path)
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        write_json(fs, inner, report)
    return report
