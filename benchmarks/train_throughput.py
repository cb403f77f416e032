"""Training samples/s of the whole clip-ray Ray job, side by side with a plain PyTorch loop.

The Ray job is what `python jobs/train.py` runs: `clip_ray.driver.trainer.train`,
a TorchTrainer whose workers train on a Ray Data stream that preprocesses the
shards while they train. The plain loop is a process of its own, with no Ray in
it, running clip_ray's TrainStep with the same model, optimiser, loss,
learning-rate schedule, global batch and torch threads (OMP_NUM_THREADS =
`cluster.cpus_per_worker`, as Ray sets a worker's), over batches of the same
stream that were preprocessed beforehand and sit in memory. Their ratio is what Ray Train + Ray Data cost (or save) per step; the
goal is ray/plain >= 0.9 with one worker.

Only steady state counts: the first --warmup-steps steps (worker start, first
batches, allocator warm-up) are left out of both. The Ray job's figure comes
from the samples/s its loop logs to MLflow every train.log_every steps (here
--log-every), so the job runs unmodified; the plain loop times the same step
range, in the same windows. Each side gets two figures: samples over time for
all timed steps, and the median window, which a burst of load from other jobs
on a shared machine moves less. Evaluation and intermediate checkpoints are off
(the final checkpoint and model upload come after the last timed step). The
whole sequence (plain, then each Ray job) runs --repeats times, interleaved, so
that a drift in the machine's load shows and averages out. The default run
stays inside epoch 0; a longer one also pays for each new epoch's stream.

    python benchmarks/train_throughput.py                  # the demo config, 1 and 2 CPU workers
    # on a GPU node of a cluster (the plain loop runs where this script does):
    python benchmarks/train_throughput.py --ray-address HEAD:6379 --workers 1,8 --cpus-per-worker 8 \\
        --preset ViT-B/32 --batch 1024 --steps 300 --warmup-steps 100 --log-every 20 \\
        --set cluster.use_gpu=true train.precision=bf16 cluster.storage_path=s3://BUCKET/bench \\
              tracking.tracking_uri=http://MLFLOW:5000

On a local cluster each Ray job gets its own Ray with exactly
workers x cpus_per_worker + --data-cpus logical CPUs, so Ray Data has its core(s)
and the workers theirs, as in `make demo`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo-cpu.yaml"


# --------------------------------------------------------------------------- the job's config


def bench_config(args, workdir: Path):
    """The config both sides train: the given YAML with timing-neutral settings, demo data filled in."""
    from clip_ray.config import load_config
    from clip_ray.driver.demo import prepare_demo
    from clip_ray.driver.prepare import prepare_job

    overrides = []
    if args.preset:
        overrides.append(f"model={{preset: {args.preset}}}")
    if args.batch:
        overrides.append(f"train.global_batch_size={args.batch}")
    overrides += [
        f"train.steps={args.steps}", f"train.log_every={args.log_every}",
        "train.eval_every=0", "train.checkpoint_every=0",  # nothing but training inside the timed steps
        f"cluster.cpus_per_worker={args.cpus_per_worker}", f"cluster.storage_path={workdir / 'runs'}",
        "cluster.fresh_start=true", "cluster.max_failures=0",
        f"tracking.tracking_uri=sqlite:///{workdir / 'mlflow.db'}", "tracking.experiment=train-throughput",
        "tracking.log_system_metrics=false",
        *args.overrides,  # last, so that they win (a cluster's storage_path and MLflow server)
    ]
    config = load_config(args.config, overrides)
    if config.demo is not None:
        config, _ = prepare_demo(config, args.data_dir)
        config.demo = None  # drawn: the runs below read its shards
    config.data.val, config.data.zeroshot_dir = [], None  # no final evaluation either
    return prepare_job(config).config  # trains the tokenizer once, for every run below


def with_workers(config, workers: int):
    import copy

    config = copy.deepcopy(config)
    config.cluster.num_workers = workers
    config.cluster.run_name = f"throughput-{workers}w"
    config.validate()
    return config


@contextlib.contextmanager
def ray_for(args, workers: int):
    """A local Ray sized for `workers` (or the cluster at --ray-address, as it is)."""
    from clip_ray.ray_session import ray_session

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback cluster needs no token
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    num_cpus = int(round(workers * args.cpus_per_worker + args.data_cpus))
    with ray_session(args.ray_address, num_cpus=num_cpus, log_to_driver=args.verbose):
        yield


# --------------------------------------------------------------------------- steady state, both sides alike


def steady_figures(rates: list[tuple[int, float]], per_step: int, warmup: int) -> dict:
    """From (step, samples/s since the previous entry) windows, those starting at or after `warmup`:
    samples over summed time, and the median window (steadier when other jobs share the machine)."""
    windows, previous = [], 0
    for step, rate in rates:
        if previous >= warmup:
            windows.append((per_step * (step - previous), rate))
        previous = step
    if not windows:
        raise SystemExit(f"no logged window after step {warmup}: raise --steps or lower --log-every")
    samples = sum(n for n, _ in windows)
    return {"samples_per_s": samples / sum(n / rate for n, rate in windows),
            "median_window_samples_per_s": statistics.median(rate for _, rate in windows),
            "timed_steps": samples // per_step, "window_samples_per_s": rates}


# --------------------------------------------------------------------------- the plain loop


def hold_batches(config, count: int, path: Path) -> int:
    """Saves `count` global batches of epoch 0's stream to `path`, preprocessed by the job's own
    pipeline; returns how many there were. Ray must be up (Ray Data makes them)."""
    import logging

    import torch
    from ray.data import DataContext

    from clip_ray.data.stream.batches import TrainBatches
    from clip_ray.data.stream.pipeline import build_train_dataset

    cfg = config
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    dataset = build_train_dataset(cfg.data, cfg.model.vision.image_size, cfg.model.text.context_length, epoch=0)
    batches = []
    stream = TrainBatches(dataset, cfg.train.global_batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
                          seed=cfg.data.seed, epoch=0)
    for batch in stream:
        batches.append((batch["image"].clone(), batch["text"].clone()))
        if len(batches) == count:
            break
    if not batches:
        raise SystemExit("the data gave no full batch")
    torch.save(batches, path)
    return len(batches)


def plain_loop(config, batches_path: Path, warmup: int) -> dict:
    """clip_ray's own TrainStep over the held batches (cycled), timed in the loop's logging windows.
    Runs in a process of its own (see plain_run)."""
    import torch

    from clip_ray.loss import build_loss
    from clip_ray.model import build_model
    from clip_ray.worker.optim import build_optimizer, lr_at, make_grad_scaler, set_lr
    from clip_ray.worker.step import TrainStep

    cfg = config
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    device = torch.device("cuda" if cfg.cluster.use_gpu else "cpu")
    batches = [(images.to(device), texts.to(device)) for images, texts in torch.load(batches_path)]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device).train()
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    step_model = torch.compile(model) if cfg.train.compile else model
    scaler = make_grad_scaler(cfg.train.precision, device.type)
    step_fn = TrainStep(step_model, optimizer, build_loss(cfg.train.loss), scaler, cfg.train, device)
    per_step, every = cfg.train.global_batch_size, cfg.train.log_every
    started = last = time.perf_counter()
    rates = []
    for step in range(1, cfg.train.steps + 1):
        images, texts = batches[(step - 1) % len(batches)]
        set_lr(optimizer, lr_at(step - 1, cfg.train))
        result = step_fn(images, texts)  # reads the loss back, so the step has finished
        if step % every == 0 or step == cfg.train.steps:
            now = time.perf_counter()
            rates.append((step, per_step * (step - (rates[-1][0] if rates else 0)) / (now - last)))
            last = now
    return {**steady_figures(rates, per_step, warmup), "wall_s": last - started,
            "torch_threads": torch.get_num_threads(), "final_loss": result.loss}


def plain_run(workdir: Path, config, warmup: int) -> dict:
    """plain_loop in a fresh process with no Ray in it, its threads set as Ray sets a worker's
    (OMP_NUM_THREADS = CPUs per worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(config.cluster.cpus_per_worker)))}
    cmd = [sys.executable, __file__, "--plain-loop", str(workdir), "--warmup-steps", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the plain loop failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the Ray job


def ray_run(config, warmup: int) -> dict:
    """One whole job through `train`; its steady state from the samples/s rank 0 logged to MLflow."""
    from mlflow.tracking import MlflowClient

    from clip_ray.driver.prepare import PreparedJob
    from clip_ray.driver.trainer import train

    started = time.perf_counter()
    outcome = train(PreparedJob(config))  # with_workers changed only the worker count of a prepared config
    wall_s = time.perf_counter() - started
    history = MlflowClient(outcome.tracking_uri).get_metric_history(outcome.mlflow_run_id, "train/samples_per_s")
    rates = sorted((m.step, m.value) for m in history)
    return {**steady_figures(rates, config.train.global_batch_size, warmup), "wall_s": wall_s,
            "mlflow_run_id": outcome.mlflow_run_id, "steps_done": outcome.summary.get("step")}


# --------------------------------------------------------------------------- report


# Ways to fold one run kind's repeats into one figure; on a machine that other jobs share, the best
# (the least disturbed repeat, as timeit takes the fastest) is the steadiest of the three.
SUMMARIES = {
    "mean of repeats": lambda runs: statistics.mean(r["samples_per_s"] for r in runs),
    "best repeat": lambda runs: max(r["samples_per_s"] for r in runs),
    "mean median window": lambda runs: statistics.mean(r["median_window_samples_per_s"] for r in runs),
}


def summarise(results: list[dict]) -> list[dict]:
    """One row per run kind: each SUMMARIES figure with its ratio to plain's, and ray/plain per repeat
    (each Ray job against the plain run just before it)."""
    names = list(dict.fromkeys(r["name"] for r in results))
    by_name = {name: [r for r in results if r["name"] == name] for name in names}
    plain_runs = by_name["plain"]
    rows = []
    for name, runs in by_name.items():
        row = {"name": name, "kind": runs[0]["kind"], "workers": runs[0]["workers"],
               "timed_steps": runs[0]["timed_steps"], "wall_s": statistics.mean(r["wall_s"] for r in runs),
               "repeats_samples_per_s": [r["samples_per_s"] for r in runs]}
        for label, fold in SUMMARIES.items():
            row[label] = fold(runs)
            row[f"{label} ray/plain"] = fold(runs) / fold(plain_runs)
        row["ray/plain per repeat"] = [r["samples_per_s"] / p["samples_per_s"] for r, p in zip(runs, plain_runs)]
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'':16s}" + "".join(f"{label:^22s}" for label in SUMMARIES))
    print(f"{'run':16s}" + f"{'samples/s':>10s} {'ray/plain':>10s} " * len(SUMMARIES)
          + f"{'wall s':>7s}   each repeat: samples/s (ray/plain)")
    for row in rows:
        is_ray = row["kind"] == "ray"
        cells = "".join(f"{row[label]:10.1f} " + (f"{row[label + ' ray/plain']:10.2f} " if is_ray else " " * 11)
                        for label in SUMMARIES)
        repeats = ", ".join(f"{v:.1f}" + (f" ({q:.2f})" if is_ray else "")
                            for v, q in zip(row["repeats_samples_per_s"], row["ray/plain per repeat"]))
        print(f"{row['name']:16s}{cells}{row['wall_s']:7.1f}   {repeats}")
    rays = sorted((row["workers"], row["best repeat"]) for row in rows if row["kind"] == "ray")
    for (n0, rate0), (n, rate) in zip(rays, rays[1:]):
        print(f"scaling {n0} -> {n} workers (best repeat): {rate / rate0:.2f}x (ideal {n / n0:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="job YAML (default: the demo config)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="config overrides, as for jobs/train.py")
    parser.add_argument("--preset", default=None, help="model preset instead of the config's model")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=90, help="steps per run, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=30, help="first steps left out of the figures")
    parser.add_argument("--log-every", type=int, default=10, help="timing window, in steps (train.log_every)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts of the Ray runs")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--data-cpus", type=float, default=1.0, help="extra logical CPUs for Ray Data (local Ray)")
    parser.add_argument("--repeats", type=int, default=2, help="times the whole sequence of runs is repeated")
    parser.add_argument("--plain-batches", type=int, default=16,
                        help="distinct batches the plain loop holds in memory and cycles through")
    parser.add_argument("--ray-address", default=None, help="cluster to run on (default: a local Ray per run)")
    parser.add_argument("--data-dir", default="demo-data", help="where a demo config's data is drawn (reused)")
    parser.add_argument("--workdir", default=None, help="runs and MLflow store (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="show the workers' logs")
    parser.add_argument("--json-out", default=None, help="also write all results as JSON here")
    parser.add_argument("--plain-loop", default=None, help=argparse.SUPPRESS)  # internal: the plain loop's process
    args = parser.parse_args()
    if args.plain_loop:
        from clip_ray.config import Config, from_dict

        workdir = Path(args.plain_loop)
        config = from_dict(Config, json.loads((workdir / "config.json").read_text()))
        print(json.dumps(plain_loop(config, workdir / "batches.pt", args.warmup_steps)), flush=True)
        return
    if args.warmup_steps < 1 or args.warmup_steps % args.log_every or args.steps <= args.warmup_steps:
        parser.error("--warmup-steps must be a positive multiple of --log-every, below --steps")
    workers = [int(n) for n in args.workers.split(",")]
    from clip_ray.config import to_dict

    def write_json(**extra) -> None:
        if args.json_out:
            Path(args.json_out).write_text(json.dumps({"args": vars(args), **header, **extra}, indent=2))

    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        config = bench_config(args, workdir)
        header = {"model": config.model.name, "global_batch": config.train.global_batch_size,
                  "precision": config.train.precision, "cpus_per_worker": config.cluster.cpus_per_worker,
                  "use_gpu": config.cluster.use_gpu, "cpu_count": os.cpu_count(),
                  "load_average_start": os.getloadavg()[0]}
        print(f"model {config.model.name}, global batch {config.train.global_batch_size}, {config.train.precision}, "
              f"{args.steps} steps of which the first {args.warmup_steps} are not timed, "
              f"{config.cluster.cpus_per_worker:g} CPU per worker (= the plain loop's torch threads), "
              f"GPU {config.cluster.use_gpu}, {args.repeats} repeat(s), load average {os.getloadavg()[0]:.2f}",
              flush=True)
        (workdir / "config.json").write_text(json.dumps(to_dict(config)))
        with ray_for(args, workers[0]):  # the plain loop's data, from the job's stream; Ray Data needs a Ray
            held = hold_batches(config, min(args.plain_batches, args.steps), workdir / "batches.pt")
        print(f"  the plain loop cycles through {held} batches held in memory", flush=True)

        results: list[dict] = []
        for repeat in range(args.repeats):
            results.append({"name": "plain", "kind": "plain", "workers": 1, "repeat": repeat,
                            **plain_run(workdir, config, args.warmup_steps)})
            print(f"  plain            {results[-1]['samples_per_s']:9.1f} samples/s", flush=True)
            for n in workers:
                name = f"ray {n} worker{'s' * (n > 1)}"
                with ray_for(args, n):
                    results.append({"name": name, "kind": "ray", "workers": n, "repeat": repeat,
                                    **ray_run(with_workers(config, n), args.warmup_steps)})
                print(f"  {name:16s} {results[-1]['samples_per_s']:9.1f} samples/s", flush=True)
                write_json(results=results)  # after every run, so a run cut short keeps what it measured

    rows = summarise(results)
    print_table(rows)
    header["load_average_end"] = os.getloadavg()[0]
    print(f"load average {header['load_average_start']:.2f} at the start, {header['load_average_end']:.2f} at the end "
          f"({os.cpu_count()} CPUs)")
    write_json(summary=rows, results=results)


if __name__ == "__main__":  # the demo data is drawn in a process pool, which re-imports this file
    main()
