"""Evaluation wall time on 1, 2 and 4 workers, and what evaluating during training costs its throughput.

Part 1: the sharded Evaluator in gloo process groups of 1, 2 and 4 ranks on this
machine, each rank a process connected to one local Ray: zero-shot on the CIFAR-10
test set (ImageFolder) and retrieval on the Flickr8k test split, with an untrained
vit-tiny at 64 px (the weights do not change the work). Each group evaluates
twice; the second pass is the figure (the first also starts Ray Data's worker
processes and the split). Twice over: with one torch thread per rank (each rank
brings its own core, as each worker of a cluster brings its GPU: the goal is
measured so) and with cores / ranks threads (one CPU budget for every group, for
reference). On a 2-core machine 4 ranks cannot beat 2.

Part 2: the same model trained in-process on Flickr8k's training split, three
times: no mid-run evaluation, sync mid-run evaluation, async (a background actor).
Throughput is samples per second between the first logged step after warm-up and
the last step, from the MLflow timestamps of train/loss; the cost of a mode is
1 - its throughput / the throughput without mid-run evaluation. The three runs are
interleaved --repeats times and each mode's median is its figure. On a small CPU
machine the async actor takes its cores from training; on a cluster it gets its own
(eval.async_num_cpus / async_num_gpus).

    python benchmarks/eval_scaling.py            # 10,000 CIFAR images, 5,000 Flickr captions, 150 steps
    python benchmarks/eval_scaling.py --quick    # 2,000 images, 1,000 captions, 60 steps
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CLIP_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))
WORLD_SIZES = (1, 2, 4)


def bench_config(args, workdir: Path):
    """configs/flickr8k-cpu.yaml on ../shared/data, sized by --quick, prepared (tokenizer trained once)."""
    from clip_ray.config import load_config
    from clip_ray.driver.prepare import prepare_job

    flickr = {"path": str(SHARED / "flickr8k"), "format": "csv", "captions_file": "captions.csv",
              "images_dir": "images"}
    overrides = [
        f"data.train=[{json.dumps({**flickr, 'split_file': 'splits/train.txt'})}]",
        f"data.val=[{json.dumps({**flickr, 'split_file': 'splits/test.txt'})}]",
        f"data.zeroshot_dir={SHARED / 'cifar10-test'}", "data.shuffle_buffer=256",
        f"eval.max_val_samples={args.val_captions}", f"eval.max_zeroshot_images={args.zeroshot_images}",
        f"train.global_batch_size={args.batch}", f"train.steps={args.steps}", "train.warmup_steps=10",
        f"train.log_every={args.log_every}", "train.checkpoint_every=0",
        f"cluster.storage_path={REPO / 'runs'}",  # where the trained tokenizer is kept between runs
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", "tracking.experiment=eval-scaling",
        "tracking.log_system_metrics=false", "tracking.log_model=false",
    ]
    return prepare_job(load_config(REPO / "configs" / "flickr8k-cpu.yaml", overrides)).config


# --------------------------------------------------------------------------- part 1: sharded evaluation


def eval_worker(rank: int, world_size: int, rendezvous: str, ray_address: str, config_file: str,
                out_dir: str, threads: int) -> None:
    """One rank: evaluates each part twice, timing each after a barrier; rank 0 saves the times."""
    import datetime

    import ray
    import torch
    import torch.distributed as dist

    from clip_ray.eval.evaluate import Evaluator
    from clip_ray.eval.gather import gather_objects
    from clip_ray.model import build_model
    from clip_ray.model.tokenizer import load_tokenizer

    torch.set_num_threads(threads)
    ray.init(address=ray_address, log_to_driver=False, logging_level="WARNING")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(minutes=20))
    try:
        config = pickle.loads(Path(config_file).read_bytes())
        torch.manual_seed(0)
        model = build_model(config.model).eval()
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
        evaluator = Evaluator(config, tokenizer, torch.device("cpu"), rank=rank, world_size=world_size)
        result: dict = {"seconds": {}, "metrics": {}, "encoded": []}
        for attempt in ("first", "second"):
            for part in ("zeroshot", "validation"):
                dist.barrier()
                start = time.perf_counter()
                result["metrics"].update(getattr(evaluator, part)(model))
                result["seconds"][(part, attempt)] = time.perf_counter() - start
        result["encoded"] = gather_objects(dict(evaluator.encoded))
        if rank == 0:
            (Path(out_dir) / f"world{world_size}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
        ray.shutdown()


def eval_scaling(config, workdir: Path, share_cores: bool, done: dict) -> dict[int, dict]:
    """{world size: rank 0's times and metrics}; threads per rank: 1, or cores / ranks with share_cores.
    `done` keeps each (world size, threads) measured, so that a group is not measured twice."""
    import ray
    import torch.multiprocessing as mp

    config_file = workdir / "config.pkl"
    config_file.write_bytes(pickle.dumps(config))
    results = {}
    for world in WORLD_SIZES:
        threads = max(1, (os.cpu_count() or 1) // world) if share_cores else 1
        if (world, threads) not in done:
            start = time.perf_counter()
            mp.start_processes(eval_worker, nprocs=world, join=True, start_method="spawn",
                               args=(world, f"file://{workdir}/rendezvous-{world}-{threads}",
                                     ray.get_runtime_context().gcs_address, str(config_file), str(workdir), threads))
            done[world, threads] = pickle.loads((workdir / f"world{world}.pkl").read_bytes())
            print(f"  {world} worker(s) x {threads} thread(s): done in {time.perf_counter() - start:.0f} s "
                  "(process start included)", flush=True)
        results[world] = done[world, threads]
    return results


def print_eval_table(title: str, results: dict[int, dict]) -> None:
    header = f"{title:<34}" + "".join(f"{f'{w} worker(s)':>14}" for w in results)
    print("\n" + header)
    rows = [("zero-shot CIFAR-10 test", "zeroshot"), ("retrieval Flickr8k test", "validation")]
    for label, part in rows:
        print(f"{label:<34}" + "".join(f"{r['seconds'][(part, 'second')]:>14.1f}" for r in results.values()))
    print(f"{'both':<34}" + "".join(f"{total(r):>14.1f}" for r in results.values()))
    print(f"{'  first pass (cold), both':<34}" + "".join(f"{total(r, 'first'):>14.1f}" for r in results.values()))
    for key in ("zeroshot/num_images", "zeroshot/top1", "val/num_captions", "val/loss", "val/image_to_text_R@5"):
        print(f"{key:<34}" + "".join(f"{r['metrics'].get(key, float('nan')):>14.4f}" for r in results.values()))
    for world, result in results.items():
        shares = ", ".join(f"rank {i}: {e.get('zeroshot', 0)} images + {e.get('val', 0)} pairs"
                           for i, e in enumerate(result["encoded"]))
        print(f"  encoded with {world}: {shares}")


def total(result: dict, attempt: str = "second") -> float:
    return sum(result["seconds"][(part, attempt)] for part in ("zeroshot", "validation"))


# --------------------------------------------------------------------------- part 2: training throughput


def train_throughput(config, workdir: Path, mode: str, eval_every: int, warmup: int) -> dict:
    """Samples/s between step `warmup` and the last step of an in-process run, from MLflow's timestamps."""
    import copy

    from mlflow import MlflowClient

    from clip_ray.worker.context import WorkerContext
    from clip_ray.worker.loop import run_training

    config = copy.deepcopy(config)
    config.train.eval_every = eval_every
    config.eval.mode = mode
    config.tracking.run_name = f"{mode}-every{eval_every}"
    start = time.perf_counter()
    summary = run_training(config, WorkerContext(checkpoint_root=workdir / f"ckpt-{mode}-{eval_every}"))
    wall = time.perf_counter() - start
    history = MlflowClient(config.tracking.tracking_uri).get_metric_history(summary["mlflow_run_id"], "train/loss")
    stamps = {m.step: m.timestamp / 1000 for m in history}
    first = min(step for step in stamps if step >= warmup)
    last = max(stamps)
    rate = (last - first) * config.train.global_batch_size / (stamps[last] - stamps[first])
    evals = MlflowClient(config.tracking.tracking_uri).get_metric_history(summary["mlflow_run_id"], "eval/seconds")
    mid_run = [m.value for m in evals if 0 < m.step < config.train.steps]
    return {"samples_per_s": rate, "wall_s": wall, "evaluated_steps": sorted(m.step for m in evals),
            "eval_s": statistics.median(mid_run) if mid_run else float("nan")}


def async_pause(config) -> float:
    """Seconds rank 0's loop stops for one async evaluation: the weights copied into the object store."""
    from clip_ray.eval.background import BackgroundEvaluations
    from clip_ray.model import build_model

    model, background, pauses = build_model(config.model), BackgroundEvaluations(config, 0, 1), []
    try:
        for step in range(5):
            start = time.perf_counter()
            background.submit(model, {"step": step})
            background.collect()
            pauses.append(time.perf_counter() - start)
    finally:
        background.close()
    return statistics.median(pauses[1:])  # the first also creates the actor's handle


def throughput_table(config, workdir: Path, args) -> dict[str, dict]:
    """The three modes, interleaved --repeats times (a drift in the machine's load then hits each alike);
    each mode's figure is the median of its repeats."""
    runs = {"no mid-run eval": ("sync", 0), "sync eval": ("sync", args.eval_every),
            "async eval": ("async", args.eval_every)}
    repeats: dict[str, list[dict]] = {label: [] for label in runs}
    for attempt in range(args.repeats):
        for label, (mode, every) in runs.items():
            repeats[label].append(train_throughput(config, workdir / f"try{attempt}", mode, every, args.warmup_steps))
            print(f"  {label}: {repeats[label][-1]['samples_per_s']:.1f} samples/s", flush=True)
    results = {label: {**tries[0], "samples_per_s": statistics.median(t["samples_per_s"] for t in tries)}
               for label, tries in repeats.items()}
    base = results["no mid-run eval"]["samples_per_s"]
    print(f"\n{'training, in-process, 1 worker':<34}{'samples/s':>12}{'cost':>8}{'eval s':>8}{'run wall s':>12}"
          "  evaluated at")
    for label, r in results.items():
        cost = 1 - r["samples_per_s"] / base
        print(f"{label:<34}{r['samples_per_s']:>12.1f}{cost:>8.0%}{r['eval_s']:>8.1f}{r['wall_s']:>12.0f}"
              f"  {r['evaluated_steps']}")
    pause = async_pause(config)
    print(f"the loop's pause per mid-run evaluation: sync {results['sync eval']['eval_s']:.1f} s, "
          f"async {pause * 1000:.0f} ms (the weights into the object store)")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes on 2 cores)")
    parser.add_argument("--only", choices=("eval", "training"), default=None, help="one part only")
    parser.add_argument("--repeats", type=int, default=None, help="training runs per mode (default 1 quick, 2 full)")
    args = parser.parse_args(argv)
    args.zeroshot_images, args.val_captions = (2000, 1000) if args.quick else (10000, 5000)
    args.batch, args.log_every = 64, 5
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.steps, args.eval_every, args.warmup_steps = (60, 20, 10) if args.quick else (150, 50, 10)

    import ray

    from clip_ray.ray_session import ray_session

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="eval-scaling-") as scratch, \
            ray_session(None, num_cpus=cores + 1, log_to_driver=False):
        workdir = Path(scratch)
        config = bench_config(args, workdir)
        print(f"{cores} cores, Ray {ray.__version__}; model {config.model.name} at {config.model.vision.image_size} px;"
              f" {args.zeroshot_images} CIFAR-10 images, {args.val_captions} Flickr8k test captions", flush=True)
        evals, measured = {}, {}
        modes = ((False, "eval wall s, 1 thread per rank"), (True, "eval wall s, cores/ranks threads"))
        for share_cores, title in modes if args.only != "training" else ():
            evals[share_cores] = eval_scaling(config, workdir, share_cores, measured)
            print_eval_table(title, evals[share_cores])
        training = throughput_table(config, workdir, args) if args.only != "eval" else None
    print()
    if evals:
        own, shared = evals[False], evals[True]
        print(f"eval 2 workers / 1 worker: ratio {total(own[2]) / total(own[1]):.2f} (goal <= 0.6; a core each)")
        print(f"eval 4 workers / 1 worker: ratio {total(own[4]) / total(own[1]):.2f} (goal <= 0.35; a core each, "
              f"and this machine has {cores})")
        print(f"eval 2 workers / 1 worker, one CPU budget: ratio {total(shared[2]) / total(shared[1]):.2f} "
              "(for reference: no goal)")
    if training is not None:
        base = training["no mid-run eval"]["samples_per_s"]
        print(f"sync eval throughput cost: {1 - training['sync eval']['samples_per_s'] / base:.0%} (for reference)")
        print(f"async eval throughput cost: {1 - training['async eval']['samples_per_s'] / base:.0%} (goal < 10%)")


if __name__ == "__main__":
    main()
