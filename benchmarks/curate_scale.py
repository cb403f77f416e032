"""Curation at scale: pairs/s per CPU and the driver's peak memory at 100k and 1M generated pairs (issue #15).

CLIP curated 400M pairs from billions; what must not grow with the input is the
driver, the one process that cannot be spread over a cluster. This generates N
text-only pairs as Parquet shards of 10,000 rows (each "image" a tiny unique
byte string, so dedup keeps them all, and image validation off), with captions
drawn from a seeded Zipf vocabulary, so a few queries match a large share of
the pairs (the per-query cap bites) and most match few. The queries file has
words at every frequency rank plus bigrams of frequent words.

Each size and balancing mode runs in a fresh Python process with a fresh local
Ray, which measures around `curate`: wall time, pairs/s and pairs/s per CPU,
the driver's peak Python heap (tracemalloc, started just before curate) and its
peak resident memory (ru_maxrss), next to the RSS it had before curate.

    python benchmarks/curate_scale.py                        # 100k and 1M, every balancing mode
    python benchmarks/curate_scale.py --sizes 20000,100000 --cpus 2

Generated data is cached under --work-dir; outputs are deleted unless --keep-output.
The last line: driver peak heap at the largest size / at the smallest (goal: within 1.2x).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

MIB = 2 ** 20
ROWS_PER_SHARD = 10_000
VOCAB_SIZE = 50_000
ZIPF_EXPONENT = 1.1
CAPTION_WORDS = (3, 10)  # inclusive range of words per caption
# Queries: the most frequent words (with short captions many pairs match nothing rarer, so the cap bites),
# words at log-uniform ranks beyond RARE_FROM_RANK (each matches few pairs) and bigrams of frequent words.
NUM_FREQUENT_QUERIES = 30
RARE_FROM_RANK = 3_000
NUM_WORD_QUERIES = 4_000
NUM_BIGRAM_QUERIES = 1_000
GOAL_RATIO = 1.2
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "fu", "gi", "ha", "je", "bo"]


# --------------------------------------------------------------------------- generated data


def vocabulary(size: int) -> np.ndarray:
    """`size` distinct made-up words, rank 0 the most frequent: base-16 numbers spelled in syllables."""
    words = []
    for rank in range(size):
        digits, n = [], rank
        while True:
            digits.append(SYLLABLES[n % 16])
            n //= 16
            if not n:
                break
        words.append("".join(digits))
    return np.array(words, dtype=object)


def zipf_probabilities(size: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, size + 1) ** exponent
    return weights / weights.sum()


def write_shard(path: Path, first_row: int, rows: int, words: pa.Array, probabilities: np.ndarray, seed: int) -> None:
    """One Parquet shard, generated column-wise: no Python loop over rows."""
    rng = np.random.default_rng([seed, first_row])
    lengths = rng.integers(CAPTION_WORDS[0], CAPTION_WORDS[1] + 1, size=rows)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    picks = rng.choice(len(probabilities), size=int(offsets[-1]), p=probabilities)
    captions = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), words.take(pa.array(picks))), " ")
    ids = np.arange(first_row, first_row + rows, dtype="<u8")
    image_bytes = np.zeros((rows, 11), np.uint8)  # b"img" + the row's number: unique, tiny, not an image
    image_bytes[:, :3] = np.frombuffer(b"img", np.uint8)
    image_bytes[:, 3:] = ids.view(np.uint8).reshape(rows, 8)
    images = pa.FixedSizeBinaryArray.from_buffers(pa.binary(11), rows, [None, pa.py_buffer(image_bytes.tobytes())])
    keys = pc.cast(pa.array(ids), pa.string())
    table = pa.table({"key": keys, "image": pc.cast(images, pa.binary()), "image_ext": pa.array(["bin"] * rows),
                      "caption": captions})
    pq.write_table(table, path, row_group_size=1000)


def generate(work_dir: Path, size: int, seed: int) -> Path:
    """N pairs as shards of ROWS_PER_SHARD rows under work_dir/pairs-N; reused when done.json matches."""
    out = work_dir / f"pairs-{size}"
    marker = out / "done.json"
    recipe = {"size": size, "seed": seed, "vocab": VOCAB_SIZE, "zipf": ZIPF_EXPONENT, "words": CAPTION_WORDS,
              "rows_per_shard": ROWS_PER_SHARD}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(recipe)):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    words = pa.array(vocabulary(VOCAB_SIZE), pa.string())
    probabilities = zipf_probabilities(VOCAB_SIZE, ZIPF_EXPONENT)
    for index, first in enumerate(range(0, size, ROWS_PER_SHARD)):
        write_shard(out / f"{index:05d}.parquet", first, min(ROWS_PER_SHARD, size - first), words, probabilities,
                    seed)
    marker.write_text(json.dumps(recipe))
    return out


def write_queries(work_dir: Path, seed: int) -> Path:
    """A few frequent words, many rare ones (log-uniform ranks) and bigrams of frequent words."""
    rng = np.random.default_rng([seed, 1])
    words = vocabulary(VOCAB_SIZE)
    rare = np.unique(np.geomspace(RARE_FROM_RANK, VOCAB_SIZE, NUM_WORD_QUERIES * 3).astype(np.int64) - 1)
    rare = rng.choice(rare, size=min(NUM_WORD_QUERIES - NUM_FREQUENT_QUERIES, len(rare)), replace=False)
    ranks = np.concatenate([np.arange(NUM_FREQUENT_QUERIES), rare])
    pairs = rng.integers(0, 200, size=(NUM_BIGRAM_QUERIES * 2, 2))
    bigrams = list(dict.fromkeys(f"{words[a]} {words[b]}" for a, b in pairs if a != b))[:NUM_BIGRAM_QUERIES]
    path = work_dir / "queries.txt"
    path.write_text("\n".join([*words[np.sort(ranks)], *bigrams]) + "\n")
    return path


# --------------------------------------------------------------------------- one measured run (fresh process)


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one_run(pairs_dir: str, queries: str, out_dir: str, cpus: int, cap: int, balance: str | None,
            dedup: bool) -> dict:
    """curate() once in this process, on a local Ray started here; what the driver used."""
    import ray

    from clip_ray.config import SourceConfig
    from clip_ray.data.offline.curate import CurateOptions, curate

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    source = SourceConfig(path=pairs_dir, format="parquet")
    fields = {"max_per_query": cap, "validate_images": False, "output_format": "parquet",
              "samples_per_shard": ROWS_PER_SHARD, "overwrite": True, "dedup_images": dedup}
    if balance is not None:
        fields["balance"] = balance
    options = CurateOptions(**fields)
    rss_before = rss_now_mib()
    tracemalloc.start()
    start = time.perf_counter()
    report = curate(source, queries, out_dir, options)
    seconds = time.perf_counter() - start
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    ray.shutdown()
    return {"pairs": report["pairs_seen"], "kept": report["kept"], "dropped": report["dropped"],
            "queries_matched": report["queries_matched"], "seconds": seconds, "heap_peak_mib": heap_peak / MIB,
            "rss_before_mib": rss_before, "rss_peak_mib": peak_rss}


def run_in_fresh_process(pairs_dir: Path, queries: Path, out_dir: Path, cpus: int, cap: int,
                         balance: str | None, dedup: bool) -> dict:
    point = json.dumps([str(pairs_dir), str(queries), str(out_dir), cpus, cap, balance, dedup])
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--point", point], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"curation of {pairs_dir} ({balance}) failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def balance_modes() -> list[str | None]:
    """Every balancing mode CurateOptions has; [None] (its only behaviour) before it had a choice."""
    from clip_ray.data.offline import curate

    if "balance" not in {f.name for f in dataclasses.fields(curate.CurateOptions)}:
        return [None]
    return list(getattr(curate, "BALANCE_MODES", ("rarest", "metaclip")))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="pairs per run, comma-separated")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="num_cpus of the local Ray")
    parser.add_argument("--max-per-query", type=int, default=None,
                        help="the cap (rarest) or threshold t (metaclip); default pairs / 50, so the same share of "
                             "the pairs is capped at every size and the kept set grows with the input")
    parser.add_argument("--balance", default=None, help="only this balancing mode (default: every mode there is)")
    parser.add_argument("--no-dedup", action="store_true",
                        help="skip exact-duplicate image removal (a shuffle of every candidate by image hash)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="/tmp/curate-scale", help="generated data (cached) and outputs")
    parser.add_argument("--keep-output", action="store_true", help="keep the curated shards")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: one measured run
    args = parser.parse_args()
    if args.point:
        print(json.dumps(one_run(*json.loads(args.point))))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    queries = write_queries(work_dir, args.seed)
    modes = balance_modes()
    if args.balance is not None:
        if args.balance not in modes:
            raise SystemExit(f"--balance {args.balance!r}: this curate has {', '.join(map(str, modes))}")
        modes = [args.balance]
    cap_text = args.max_per_query or "pairs / 50"
    print(f"curate: {len(queries.read_text().splitlines())} queries, cap {cap_text}, {args.cpus} CPUs, "
          f"dedup {'off' if args.no_dedup else 'on'}, text-only pairs (validate_images off), "
          f"a fresh driver and local Ray per run")
    header = (f"{'pairs':>9} {'balance':>9} {'seconds':>8} {'pairs/s':>8} {'/s/CPU':>7} {'heap MiB':>9} "
              f"{'RSS before':>10} {'RSS peak':>9} {'kept':>8}  fates")
    rows = []
    for size in sizes:
        start = time.perf_counter()
        pairs_dir = generate(work_dir, size, args.seed)
        print(f"[{size} pairs ready in {time.perf_counter() - start:.1f} s: {pairs_dir}]")
    print(header)
    for size in sizes:
        for mode in modes:
            out_dir = work_dir / f"out-{size}-{mode or 'default'}"
            cap = args.max_per_query or max(1, size // 50)
            r = run_in_fresh_process(work_dir / f"pairs-{size}", queries, out_dir, args.cpus, cap, mode,
                                     not args.no_dedup)
            if not args.keep_output:
                shutil.rmtree(out_dir, ignore_errors=True)
            rate = r["pairs"] / r["seconds"]
            rows.append({"size": size, "balance": mode, **r})
            fates = ", ".join(f"{fate} {n}" for fate, n in r["dropped"].items())
            print(f"{r['pairs']:>9} {mode or 'default':>9} {r['seconds']:>8.1f} {rate:>8.0f} {rate / args.cpus:>7.0f} "
                  f"{r['heap_peak_mib']:>9.1f} {r['rss_before_mib']:>10.0f} {r['rss_peak_mib']:>9.0f} "
                  f"{r['kept']:>8}  {fates}", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if len(sizes) < 2:
        return
    ratios = {}
    for mode in modes:
        small, large = (next(r for r in rows if r["size"] == s and r["balance"] == mode) for s in (sizes[0], sizes[-1]))
        ratios[mode] = (large["heap_peak_mib"] / small["heap_peak_mib"], large["rss_peak_mib"] / small["rss_peak_mib"])
    named = ", ".join(f"{mode or 'default'} {heap:.2f}x (RSS {rss:.2f}x)" for mode, (heap, rss) in ratios.items())
    worst = max(heap for heap, _ in ratios.values())
    verdict = "met" if worst <= GOAL_RATIO else "NOT met"
    print(f"driver peak heap at {sizes[-1]} pairs / at {sizes[0]}: {named}; goal within {GOAL_RATIO}x: {verdict}")


if __name__ == "__main__":
    main()
