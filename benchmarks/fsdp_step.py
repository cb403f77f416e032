"""model_step.py's distributed variants: clip-ray's training step as N processes, FSDP against DDP.

`launch` starts one process of this file per rank (gloo on the CPU, nccl with one GPU each; the ranks meet
through a file, no torchrun) and merges what they print. Each rank builds the model, wraps it with the
project's own `wrap_for_training` (train.strategy ddp or fsdp), builds the optimiser on the wrapped
(for FSDP: sharded) parameters, and times `TrainStep` on a random batch of its own, the loss gathering
every rank's features as in training. Per rank it reports:

- peak memory: on CUDA `torch.cuda.max_memory_allocated` over the timed steps; on the CPU the process's
  maximum RSS over its whole life (model build included), and where Linux lets a process reset its
  high-water mark (/proc/self/clear_refs), the peak RSS of the timed steps alone. RSS includes the
  interpreter, torch's libraries and the allocator's slack: `baseline_rss_gib` measures a process that
  only imported torch, for the reader to subtract;
- held state: the bytes of the parameters, gradients and optimiser state that rank holds after a step,
  counted from the tensors themselves (local shards under FSDP). This is the clean figure. Not in it,
  though in the peak: DDP's gradient buckets (another 4 bytes a parameter), FSDP's gathered blocks,
  activations.

One rank: `wrap_for_training` leaves a lone process's model as it is, so a world-size-1 'ddp' is the plain
model. A world-size-1 'fsdp' (a machine with one GPU) is sharded anyway, over a one-rank group: its shards
are the whole tensors and its gathers copies, so its memory and speed are FSDP's overhead, not its saving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 2**30


# --------------------------------------------------------------------------- one rank


def _local_bytes(tensor) -> int:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def held_state(model, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimiser state on this rank (its shards only, under FSDP)."""
    import torch

    params = list(model.parameters())
    return {
        "params": sum(_local_bytes(p) for p in params),
        "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(_local_bytes(value) for state in optimizer.state.values() for value in state.values()
                         if isinstance(value, torch.Tensor)),
    }


def _reset_rss_peak() -> bool:
    """Resets this process's VmHWM (Linux 4.0+); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_peak_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB
    return float("nan")


def run_rank(args) -> dict:
    """This rank's figures for the variant described by `args` (see `main`)."""
    import torch
    import torch.distributed as dist

    from clip_ray.config import TrainConfig
    from clip_ray.loss import build_loss
    from clip_ray.model import build_model, get_preset
    from clip_ray.worker import sharding
    from clip_ray.worker.optim import build_optimizer, make_grad_scaler
    from clip_ray.worker.step import TrainStep

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(args.rank)
        device = torch.device("cuda", args.rank)
    else:
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{args.init_file}",
                            rank=args.rank, world_size=args.world_size)
    try:
        model_cfg = get_preset(args.preset)
        model_cfg.grad_checkpointing = args.ckpt
        compiled = args.compile_mode is not None
        train_cfg = TrainConfig(precision=args.precision, strategy=args.strategy, lr=1e-4, warmup_steps=0,
                                global_batch_size=args.batch * args.world_size, compile=compiled,
                                compile_mode=args.compile_mode or "default")
        torch.manual_seed(0)  # the same initial weights on every rank
        model = build_model(model_cfg, device=device if cuda else None)
        train_model = sharding.wrap_for_training(model, args.strategy, device, args.precision, shard_alone=True)
        optimizer = build_optimizer(model, train_cfg, model_cfg)
        if compiled:
            train_model = torch.compile(train_model, mode=args.compile_mode)
        scaler = make_grad_scaler(args.precision, device.type)
        step = TrainStep(train_model, optimizer, build_loss(train_cfg.loss), scaler, train_cfg, device)

        torch.manual_seed(1 + args.rank)  # each rank its own pairs
        size = model_cfg.vision.image_size
        images = torch.randn(args.batch, 3, size, size, device=device)
        texts = torch.randint(1, model_cfg.text.vocab_size, (args.batch, model_cfg.text.context_length), device=device)

        def all_ranks_done() -> None:
            dist.all_reduce(torch.zeros(1, device=device))
            if cuda:
                torch.cuda.synchronize()

        started = time.perf_counter()
        for _ in range(args.warmup):
            step(images, texts)
        all_ranks_done()
        warmup_s = time.perf_counter() - started
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss_reset = not cuda and _reset_rss_peak()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            result = step(images, texts)
        all_ranks_done()
        elapsed = time.perf_counter() - started
        busy = (time.process_time() - cpu_started) / elapsed

        # busy: CPU seconds per second of the timed steps (all threads); far below the thread count on a
        # CPU run means the rank waited (for the other ranks' collectives, or for a core on a loaded box).
        figures = {"rank": args.rank, "elapsed_s": elapsed, "busy": busy, "warmup_s": warmup_s,
                   "final_loss": result.loss, "skipped": result.skipped, "sharded": sharding.is_sharded(model),
                   "held_bytes": held_state(model, optimizer),
                   "params_total": sum(p.numel() for p in model.parameters())}
        if cuda:
            figures["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            figures["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            figures["device_name"] = torch.cuda.get_device_name()
        else:
            figures["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB
            figures["steps_peak_gib"] = _rss_peak_gib() if rss_reset else None
        return figures
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the launcher


def baseline_rss_gib() -> float:
    """Maximum RSS of a process that imported torch and built nothing."""
    probe = "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1]) / 2**20


def _stop(procs) -> None:
    """Ends the rank processes still running, with whatever they started (inductor's compile workers)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def launch(variant: str, spec: dict, world_size: int, timeout: float) -> dict | str:
    """Runs `variant` on `world_size` rank processes; their merged figures, or a line saying why none.

    `spec`: device, preset, batch (per rank), steps, warmup, precision, strategy, compile_mode (None:
    eager), ckpt, threads (per rank, CPU)."""
    # The ranks run in sessions of their own (so that _stop reaches their compile workers), out of reach of
    # a `timeout` around this process: a SIGTERM here must end them too, through the finally below.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _launch(variant, spec, world_size, timeout)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _launch(variant: str, spec: dict, world_size: int, timeout: float) -> dict | str:
    with tempfile.TemporaryDirectory(prefix="fsdp-step-") as tmp:
        base = [sys.executable, __file__, "--world-size", str(world_size), "--init-file", f"{tmp}/rendezvous"]
        for key, value in spec.items():
            if value is not None and value is not False:
                base += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
        procs, logs = [], []
        for rank in range(world_size):
            logs.append(open(f"{tmp}/rank{rank}.log", "w"))
            procs.append(subprocess.Popen(base + ["--rank", str(rank), "--out", f"{tmp}/rank{rank}.json"],
                                          stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        try:
            while any(proc.poll() is None for proc in procs):
                failed = [rank for rank, proc in enumerate(procs) if proc.poll() not in (None, 0)]
                if failed:
                    log = Path(f"{tmp}/rank{failed[0]}.log").read_text()
                    return f"FAILED on rank {failed[0]}\n{log[-2000:]}"
                if time.monotonic() > deadline:
                    return f"gave up after {timeout:.0f} s"
                time.sleep(0.5)
        finally:
            _stop(procs)
            for log in logs:
                log.close()
        failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
        if failed:
            return f"FAILED on rank {failed[0]}\n{Path(f'{tmp}/rank{failed[0]}.log').read_text()[-2000:]}"
        ranks = [json.loads(Path(f"{tmp}/rank{rank}.json").read_text()) for rank in range(world_size)]
    return merge(variant, ranks, spec)


def merge(variant: str, ranks: list[dict], spec: dict) -> dict:
    """The variant's figures from its ranks': global throughput over the slowest rank's time."""
    elapsed = max(r["elapsed_s"] for r in ranks)
    held = [sum(r["held_bytes"].values()) / GIB for r in ranks]
    return {
        "variant": variant,
        "world_size": len(ranks),
        "samples_per_s": len(ranks) * spec["batch"] * spec["steps"] / elapsed,
        "step_ms": 1000 * elapsed / spec["steps"],
        "warmup_s": max(r["warmup_s"] for r in ranks),
        "final_loss": ranks[0]["final_loss"],
        "peak_mem_gib": max(r["peak_gib"] for r in ranks),
        "held_gib": max(held),
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="one rank of a model_step.py distributed variant (internal)")
    for name in ("--device", "--preset", "--precision", "--strategy", "--init-file", "--out"):
        parser.add_argument(name, required=True)
    for name in ("--rank", "--world-size", "--batch", "--steps", "--warmup"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--ckpt", action="store_true")
    args = parser.parse_args()
    figures = run_rank(args)
    Path(args.out).write_text(json.dumps(figures))


if __name__ == "__main__":
    main()
