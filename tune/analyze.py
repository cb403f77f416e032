"""Scaling-law analysis of a finished sweep or any results table.

    python tune/analyze.py RESULTS.csv|RESULTS.parquet|SWEEP_DIR --out DIR \
        [--metric val/loss --metric zeroshot/top1 ...] [--budget 1e18]

Prints a summary per metric and writes scaling_fit.json plus the PNG plots; with
several metrics each gets its own folder under --out. The work is done by
`clip_ray.scaling.analyze`, which tune/sweep.py also calls when a sweep ends.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from clip_ray.scaling import analyze, format_summary, load_sweep
from clip_ray.scaling.analysis import read_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="results .csv/.parquet, or a sweep directory holding one")
    parser.add_argument("--out", type=Path, help="output folder (default: SOURCE_DIR/analysis)")
    parser.add_argument("--metric", action="append", help="metric to analyse, repeatable (default val_loss)")
    parser.add_argument("--error-from", default="auto", choices=["auto", "loss", "accuracy"],
                        help="error = value (loss) or 1 - value (accuracy); auto reads the metric name")
    parser.add_argument("--budget", type=float, help="compute budget in FLOPs for the optimal N and D")
    parser.add_argument("--curves", type=Path, help="learning-curve table (default: curves.* in the sweep dir)")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="largest-compute runs held out for the extrapolation check: a fraction, or a count if >= 1")
    parser.add_argument("--data-column", default="samples_seen", help="D in L(N, D): samples_seen, tokens, ...")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results, curves = load_sweep(args.source)
    if args.curves is not None:
        curves = read_table(args.curves)
    metrics = args.metric or ["val_loss"]
    out = args.out or (args.source if args.source.is_dir() else args.source.parent) / "analysis"
    holdout = int(args.holdout) if args.holdout >= 1 else args.holdout
    for metric in metrics:
        out_dir = out if len(metrics) == 1 else out / re.sub(r"[^\w.@-]+", "_", metric)
        report = analyze(results, out_dir, metric=metric, error_from=args.error_from, budget=args.budget,
                         curves=curves, n_boot=args.n_boot, seed=args.seed, holdout=holdout,
                         data_column=args.data_column)
        print(format_summary(report))
        print(f"wrote {report['json']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
