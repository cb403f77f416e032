"""Time from a restart to the first training step, resumed at 10% and at 90% of an epoch.

One in-process training run (world size 1, configs/flickr8k-cpu.yaml on the
Flickr8k training split: 35,455 captions of real photos) writes checkpoints every
tenth of an epoch up to 90%. Then a fresh `run_training` resumes from the 10%
checkpoint and from the 90% one, alternately, --repeats times each, each from its
own copy of the checkpoint. A resume's figure is the time from calling
`run_training` to the MLflow timestamp of its first step's loss: building the
model, loading the checkpoint, starting the stream at the worker's place, the
first batch and the step.

Resumed streams read no unit they had finished and decode at most one shuffle
window again (clip_ray.data.stream.batches), so the two should cost the same. For
reference the script also prints what a resume that decodes every consumed row
again would add, at the stream's own rate without training (measured here on
--drain-batches batches).

    python benchmarks/resume_cost.py              # vit-tiny at 64 px, batch 128
    python benchmarks/resume_cost.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CLIP_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))
GOAL = 1.3
CAPTIONS_PER_PHOTO = 5


def bench_config(args, workdir: Path):
    """configs/flickr8k-cpu.yaml on ../shared/data, no evaluation, prepared once (tokenizer trained once)."""
    from clip_ray.config import load_config
    from clip_ray.driver.prepare import prepare_job

    flickr = {"path": str(SHARED / "flickr8k"), "format": "csv", "captions_file": "captions.csv",
              "images_dir": "images", "split_file": "splits/train.txt"}
    overrides = [
        f"data.train=[{json.dumps(flickr)}]", "data.val=[]", "data.zeroshot_dir=null",
        f"data.shuffle_buffer={args.shuffle_buffer}", f"train.global_batch_size={args.batch}",
        "train.eval_every=0", "train.log_every=1", "train.warmup_steps=10", "train.keep_checkpoints=20",
        f"cluster.storage_path={REPO / 'runs'}",  # where the trained tokenizer is kept between runs
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", "tracking.experiment=resume-cost",
        "tracking.log_system_metrics=false", "tracking.log_model=false",
    ]
    return prepare_job(load_config(REPO / "configs" / "flickr8k-cpu.yaml", overrides)).config


def steps_per_epoch(config) -> int:
    """World size 1: every full batch of the split's captions."""
    photos = (SHARED / "flickr8k" / "splits" / "train.txt").read_text().split()
    return len(photos) * CAPTIONS_PER_PHOTO // config.train.global_batch_size


def first_step_time(config, summary: dict, step: int) -> float:
    """Wall-clock time (s since the epoch) at which `step`'s loss was logged in this run's MLflow run."""
    from mlflow import MlflowClient

    history = MlflowClient(config.tracking.tracking_uri).get_metric_history(summary["mlflow_run_id"], "train/loss")
    return max(m.timestamp for m in history if m.step == step) / 1000


def stream_rate(config, batches: int) -> float:
    """Pairs per second the training stream delivers on its own (decode, crop, tokenize; no training)."""
    from clip_ray.data.stream.batches import TrainBatches
    from clip_ray.data.stream.pipeline import build_train_dataset

    dataset = build_train_dataset(config.data, config.model.vision.image_size, config.model.text.context_length)
    stream = TrainBatches(dataset, config.train.global_batch_size, shuffle_buffer=config.data.shuffle_buffer,
                          seed=config.data.seed, epoch=0)
    start, rows = time.perf_counter(), 0
    for rows_so_far, batch in enumerate(stream, start=1):
        rows += len(batch["key"])
        if rows_so_far == batches:
            break
    return rows / (time.perf_counter() - start)


def train(config, root: Path, steps: int) -> tuple[dict, float]:
    import copy

    from clip_ray.worker.context import WorkerContext
    from clip_ray.worker.loop import run_training

    config = copy.deepcopy(config)
    config.train.steps = steps
    started = time.time()
    summary = run_training(config, WorkerContext(checkpoint_root=root, keep_checkpoints=20))
    return summary, started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--shuffle-buffer", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--drain-batches", type=int, default=24)
    args = parser.parse_args()
    if not (SHARED / "flickr8k").is_dir():
        raise SystemExit(f"needs the Flickr8k photos at {SHARED / 'flickr8k'} (set CLIP_RAY_SHARED_DATA)")

    import logging

    import ray
    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        config = bench_config(args, workdir)
        epoch = steps_per_epoch(config)
        tenth = max(1, round(epoch / 10))
        config.train.checkpoint_every = tenth
        print(f"Flickr8k train split: {epoch} steps of {args.batch} an epoch; checkpoints every {tenth} steps; "
              f"shuffle window {config.data.shuffle_buffer} rows; {os.cpu_count()} CPUs", flush=True)

        start = time.perf_counter()
        train(config, workdir / "first", 9 * tenth)
        first_run = time.perf_counter() - start
        print(f"first run: {9 * tenth} steps in {first_run:.0f} s "
              f"({9 * tenth * args.batch / first_run:.0f} pairs/s end to end)", flush=True)
        rows_per_s = stream_rate(config, args.drain_batches)
        print(f"the stream alone: {rows_per_s:.0f} pairs/s", flush=True)

        points = {"10%": tenth, "90%": 9 * tenth}
        waits: dict[str, list[float]] = {name: [] for name in points}
        for repeat in range(args.repeats):
            for name, step in points.items():
                root = workdir / f"resume-{name[:-1]}-{repeat}"
                checkpoint = f"checkpoint_{step:09d}"
                shutil.copytree(workdir / "first" / checkpoint, root / checkpoint)
                summary, started = train(config, root, step + 1)
                waits[name].append(first_step_time(config, summary, step + 1) - started)
                print(f"  resume at {name} of the epoch (step {step}): first step after {waits[name][-1]:.1f} s",
                      flush=True)
    ray.shutdown()

    low, high = statistics.median(waits["10%"]), statistics.median(waits["90%"])
    print()
    print(f"{'resumed at':<14}{'step':>6}{'restart -> first step (s)':>28}{'+ re-decoding skipped rows (s)':>33}")
    for name, step in points.items():
        replay = step * args.batch / rows_per_s
        print(f"{name + ' of epoch':<14}{step:>6}{statistics.median(waits[name]):>28.1f}{replay:>33.1f}")
    print(f"(the last column: what a resume that decodes every consumed row again would add, at the stream's "
          f"{rows_per_s:.0f} pairs/s)")
    print(f"ratio {high / low:.2f} (goal <= {GOAL})")


if __name__ == "__main__":
    main()
