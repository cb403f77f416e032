"""Training-step speed and memory of clip-ray's model, side by side with OpenCLIP's.

One run measures every variant on the same machine, preset, batch and optimiser:
forward + backward + AdamW samples/s, peak memory, and (on a GPU) model FLOPs
utilisation = 3 x measured forward FLOPs x samples/s / the card's bf16 dense peak.
Each variant runs in its own subprocess so that peak memory and compile caches
belong to it alone.

    python benchmarks/model_step.py                      # CPU, small preset
    python benchmarks/model_step.py --device cuda        # ViT-B/16, 224 px, batch 256, bf16
    python benchmarks/model_step.py --device cuda --profile-dir /tmp/prof   # + where the GPU time goes
    python benchmarks/model_step.py --sharded            # DDP vs FSDP, 2 CPU processes, ViT-B/32, 8 a rank
    python benchmarks/model_step.py --device cuda --sharded   # ViT-H/14 under FSDP, bf16, on every GPU

A variant is "<impl> <eager|compile> [flags]": impl is clip-ray or openclip; the
flags are ckpt (gradient checkpointing), a torch.compile mode (reduce-overhead
for CUDA graphs, max-autotune-no-cudagraphs for searched matmul kernels) and a
strategy, ddp or fsdp (clip-ray only), which makes it a distributed variant:
--world-size processes, one per GPU or sharing the CPU's cores, running the
project's own TrainStep on --batch pairs each (benchmarks/fsdp_step.py). Those
report global samples/s and, per rank, peak memory and the bytes of parameters,
gradients and optimiser state the rank holds (its shards under FSDP).

OpenCLIP (`open_clip_torch`, the `bench` extra) is the reference; clip_ray/ never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# bf16 dense tensor-core peaks (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

CPU_VARIANTS = ["clip-ray eager", "clip-ray compile", "openclip eager", "openclip compile"]
# Most telling first, so a run cut short by its time limit keeps the comparisons that matter.
GPU_VARIANTS = [
    "clip-ray compile", "openclip compile", "clip-ray compile reduce-overhead", "clip-ray eager",
    "openclip eager", "clip-ray compile ckpt", "clip-ray eager ckpt", "clip-ray compile max-autotune-no-cudagraphs",
]
COMPILE_MODES = ("reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STRATEGIES = ("ddp", "fsdp")
# --sharded: the memory FSDP saves per rank against DDP (CPU), and the model FSDP is for (GPU).
CPU_SHARDED_VARIANTS = ["clip-ray eager ddp", "clip-ray eager fsdp"]
GPU_SHARDED_VARIANTS = ["clip-ray eager fsdp ckpt"]

# Kernel-name fragments -> the part of the step they belong to, for the profile's breakdown; first match wins
# (inductor names its matmul templates triton_tem_*, its fused pointwise and norm kernels triton_poi/red/per_*).
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor")),
    ("matmul", ("triton_tem",)),
    ("fused elementwise/norm (triton)", ("triton",)),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "mm", "conv", "linear")),
]


def parse_variant(variant: str) -> tuple[str, str, str, bool, str | None]:
    """'clip-ray compile reduce-overhead' -> (impl, eager|compile, torch.compile mode, checkpointing,
    strategy: None for one process, else ddp or fsdp)."""
    impl, mode, *flags = variant.split()
    unknown = [f for f in flags if f != "ckpt" and f not in COMPILE_MODES + STRATEGIES]
    strategies = [f for f in flags if f in STRATEGIES]
    if impl not in ("clip-ray", "openclip") or mode not in ("eager", "compile") or unknown \
            or len(strategies) > 1 or (strategies and impl != "clip-ray"):
        raise SystemExit(f"bad variant {variant!r}: expected '<clip-ray|openclip> <eager|compile> "
                         f"[ckpt] [{'|'.join(COMPILE_MODES)}] [ddp|fsdp (clip-ray only)]'")
    compile_mode = next((f for f in flags if f in COMPILE_MODES), "default")
    return impl, mode, compile_mode, "ckpt" in flags, (strategies or [None])[0]


def kernel_breakdown(profiler, on_gpu: bool) -> dict[str, float]:
    """Share of the profiled time per kind of kernel (GPU kernels on a GPU, aten ops on a CPU)."""
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        if on_gpu:
            device_us = event.self_device_time_total if event.device_type.name == "CUDA" else 0.0
        else:
            device_us = event.self_cpu_time_total if event.key.startswith("aten::") else 0.0
        if device_us <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, fragments in KERNEL_KINDS if any(f in name for f in fragments)), "other")
        totals[kind] = totals.get(kind, 0.0) + device_us
    everything = sum(totals.values()) or 1.0
    return {kind: us / everything for kind, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def build_openclip(config):
    """OpenCLIP's CLIP with exactly the configuration of a clip-ray ModelConfig (ViT only)."""
    import open_clip

    v, t = config.vision, config.text
    vision_cfg = open_clip.CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.head_width,
                                         mlp_ratio=v.mlp_ratio, patch_size=v.patch_size,
                                         image_size=v.image_size)
    text_cfg = open_clip.CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size,
                                     width=t.width, heads=t.width // t.head_width, layers=t.layers,
                                     mlp_ratio=t.mlp_ratio)
    return open_clip.CLIP(config.embed_dim, vision_cfg, text_cfg,
                          quick_gelu=config.activation == "quick_gelu")


def run_variant(args) -> dict:
    """Times one variant in this process and returns its figures."""
    import torch

    from clip_ray.loss import ClipLoss
    from clip_ray.model import build_model, get_preset, model_stats

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = get_preset(args.preset)
    impl, mode, compile_mode, checkpointing, _ = parse_variant(args.variant)

    model = build_model(config) if impl == "clip-ray" else build_openclip(config)
    if checkpointing:
        model.set_grad_checkpointing(True)
    model = model.to(device).train()
    step_model = torch.compile(model, mode=compile_mode) if mode == "compile" else model

    loss_fn = ClipLoss()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    images = torch.randn(args.batch, 3, config.vision.image_size, config.vision.image_size, device=device)
    tokens = torch.randint(1, config.text.vocab_size, (args.batch, config.text.context_length), device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]

    def step() -> float:
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = step_model(images, tokens)
            if isinstance(out, dict):  # OpenCLIP returns a dict when asked, a tuple otherwise
                out = (out["image_features"], out["text_features"], out["logit_scale"])
            loss = loss_fn(out[0], out[1], out[2])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    sync()
    elapsed = time.perf_counter() - start
    samples_per_s = args.batch * args.steps / elapsed
    result = {
        "variant": args.variant,
        "samples_per_s": samples_per_s,
        "step_ms": 1000 * elapsed / args.steps,
        "warmup_s": warmup_s,
        "final_loss": float(last),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        flops_per_sample = model_stats(config)["flops_per_sample"]
        result["device_name"] = name
        result["train_tflops"] = 3 * flops_per_sample * samples_per_s / 1e12
        if peak and args.precision == "bf16":
            result["mfu"] = 3 * flops_per_sample * samples_per_s / peak
    else:
        result["peak_mem_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if args.profile_dir:
        result["kernel_share"] = profile_steps(step, sync, device.type == "cuda", args.variant,
                                               Path(args.profile_dir))
    return result


def profile_steps(step, sync, on_gpu: bool, variant: str, out_dir: Path, steps: int = 3) -> dict[str, float]:
    """A few more steps under torch.profiler: the top kernels as a table file, and the share of each kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        sync()
    out_dir.mkdir(parents=True, exist_ok=True)
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_key, row_limit=40, max_name_column_width=90)
    (out_dir / (variant.replace(" ", "_") + ".txt")).write_text(table)
    return kernel_breakdown(profiler, on_gpu)


def run_in_subprocess(variant: str, args) -> dict | str:
    """One single-process variant in a process of its own: its figures, or a line saying why none."""
    cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--preset", args.preset,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--precision", args.precision] + (["--profile-dir", args.profile_dir] if args.profile_dir else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout)
    except subprocess.TimeoutExpired:
        return f"gave up after {args.variant_timeout:.0f} s"
    if proc.returncode != 0:
        return f"FAILED\n{proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_distributed(variant: str, args) -> dict | str:
    """A ddp/fsdp variant on --world-size rank processes (fsdp_step.launch), with its MFU on a GPU."""
    import fsdp_step

    _, mode, compile_mode, checkpointing, strategy = parse_variant(variant)
    spec = {"device": args.device, "preset": args.preset, "batch": args.batch, "steps": args.steps,
            "warmup": args.warmup, "precision": args.precision, "strategy": strategy,
            "compile_mode": compile_mode if mode == "compile" else None, "ckpt": checkpointing,
            "threads": None if args.device == "cuda" else max(1, (os.cpu_count() or 1) // args.world_size)}
    result = fsdp_step.launch(variant, spec, args.world_size, args.variant_timeout)
    if isinstance(result, str):
        return result
    name = result["ranks"][0].get("device_name", "")
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak and args.precision == "bf16":
        from clip_ray.model import get_preset, model_stats

        result["mfu"] = 3 * model_stats(get_preset(args.preset))["flops_per_sample"] \
            * result["samples_per_s"] / (peak * args.world_size)
    return result


def print_single_table(results: list[dict]) -> None:
    by_name = {r["variant"]: r for r in results}
    print(f"\n{'variant':44s}  samples/s   step ms   peak GiB   warm-up s   MFU     vs openclip (same mode)")
    for r in results:
        impl, mode_and_flags = r["variant"].split(maxsplit=1)
        ref = by_name.get(f"openclip {mode_and_flags}")  # like with like: same compile mode and checkpointing
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref and impl == "clip-ray" else ""
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['variant']:44s} {r['samples_per_s']:10.1f} {r['step_ms']:9.1f} {r['peak_mem_gib']:10.2f} "
              f"{r['warmup_s']:11.1f}   {mfu:7s} {ratio}")


def print_sharded_table(results: list[dict], cuda: bool, baseline_gib: float | None) -> None:
    """Global samples/s; per rank (rank 0 / rank 1 / ...) peak memory and held parameters+grads+optimizer."""
    def per_rank(values) -> str:
        values = list(values)
        if len(values) > 4:
            return f"{max(values):.2f} max, {min(values):.2f} min"
        return " / ".join(f"{v:.2f}" for v in values)

    peak = "peak allocated GiB/rank" if cuda else "max RSS GiB/rank (timed steps only)"
    print(f"\n{'variant':28s} ranks  samples/s   step ms  CPU busy/rank  {peak:38s} "
          "held GiB/rank = params + grads + optimizer")
    for r in results:
        ranks = r["ranks"]
        memory = per_rank(x["peak_gib"] for x in ranks)
        if not cuda and all(x.get("steps_peak_gib") is not None for x in ranks):
            memory += f" ({per_rank(x['steps_peak_gib'] for x in ranks)})"
        held = " + ".join(f"{max(x['held_bytes'][k] for x in ranks) / 2**30:.2f}" for k in ("params", "grads",
                                                                                           "optimizer"))
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if "mfu" in r else ""
        busy = per_rank(x["busy"] for x in ranks)
        print(f"{r['variant']:28s} {r['world_size']:5d} {r['samples_per_s']:10.2f} {r['step_ms']:9.0f}  {busy:13s}  "
              f"{memory:38s} {per_rank(sum(x['held_bytes'].values()) / 2**30 for x in ranks)} = {held}{mfu}")
    if baseline_gib is not None:
        print(f"baseline: a process that only imported torch has a max RSS of {baseline_gib:.2f} GiB "
              "(part of every rank's RSS above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sharded", action="store_true",
                        help="run the DDP/FSDP comparison (distributed variants) instead of the one-process ones")
    parser.add_argument("--world-size", type=int, default=None,
                        help="processes of a distributed variant; default 2 on CPU, every visible GPU on CUDA")
    parser.add_argument("--preset", default=None, help="default: vit-small-cpu on CPU, ViT-B/16 on CUDA; "
                                                       "with --sharded ViT-B/32 on CPU, ViT-H/14 on CUDA")
    parser.add_argument("--batch", type=int, default=None,
                        help="default: 64 on CPU, 256 on CUDA; per rank for ddp/fsdp (with --sharded 8 on CPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 (1 with --sharded on CPU)")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"])
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--json-out", default=None, help="also write all results as JSON here")
    parser.add_argument("--profile-dir", default=None,
                        help="profile 3 more steps per variant: kernel tables here, shares in the results")
    parser.add_argument("--variant-timeout", type=float, default=600,
                        help="seconds before a variant (compile included) is given up")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if args.sharded:
        args.preset = args.preset or ("ViT-H/14" if cuda else "ViT-B/32")
        args.batch = args.batch or (256 if cuda else 8)
        args.steps = args.steps or (10 if cuda else 3)
        args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    else:
        args.preset = args.preset or ("ViT-B/16" if cuda else "vit-small-cpu")
        args.batch = args.batch or (256 if cuda else 64)
        args.steps = args.steps or (20 if cuda else 10)
        args.warmup = args.warmup if args.warmup is not None else 3
    args.precision = args.precision or ("bf16" if cuda else "fp32")

    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return

    default = (GPU_SHARDED_VARIANTS if cuda else CPU_SHARDED_VARIANTS) if args.sharded \
        else (GPU_VARIANTS if cuda else CPU_VARIANTS)
    variants = args.variants.split(",") if args.variants else default
    distributed = [v for v in variants if parse_variant(v)[4]]  # a typo stops the run here, not an hour later
    if distributed and not args.world_size:
        import torch

        args.world_size = max(1, torch.cuda.device_count()) if cuda else 2
    print(f"preset {args.preset}, batch {args.batch}{' per rank' if distributed else ''}, {args.precision}, "
          f"{args.steps} timed steps after {args.warmup} warm-up steps, device {args.device}, "
          f"{os.cpu_count()} CPUs" + (f", {args.world_size} processes for ddp/fsdp" if distributed else ""),
          flush=True)
    if distributed and cuda and args.world_size == 1:
        print("one GPU: 'ddp' is the plain model, 'fsdp' shards over a one-rank group (whole shards): its "
              "figures are FSDP's overhead, not its saving", flush=True)
    baseline = None
    if distributed and not cuda:
        import fsdp_step

        baseline = fsdp_step.baseline_rss_gib()
    results = []
    for variant in variants:
        r = run_distributed(variant, args) if variant in distributed else run_in_subprocess(variant, args)
        if isinstance(r, str):
            print(f"{variant}: {r}", flush=True)
            continue
        results.append(r)
        if args.json_out:  # after every variant, so a run cut short keeps what it measured
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "baseline_rss_gib": baseline,
                                                       "results": results}, indent=2))
        print(f"  {variant:44s} {r['samples_per_s']:9.1f} samples/s  peak {r['peak_mem_gib']:6.2f} GiB"
              + (" (max over ranks)" if "ranks" in r else "")
              + (f"  MFU {100 * r['mfu']:5.1f}%" if "mfu" in r else ""), flush=True)
        if "kernel_share" in r:
            print("    device time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["kernel_share"].items()),
                  flush=True)

    single = [r for r in results if "ranks" not in r]
    if single:
        print_single_table(single)
    sharded = [r for r in results if "ranks" in r]
    if sharded:
        print_sharded_table(sharded, cuda, baseline)


if __name__ == "__main__":
    main()
