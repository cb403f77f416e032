"""Training-step speed and memory of clip-ray's model, side by side with OpenCLIP's.

One run measures every variant on the same machine, preset, batch and optimiser:
forward + backward + AdamW samples/s, peak memory, and (on a GPU) model FLOPs
utilisation = 3 x measured forward FLOPs x samples/s / the card's bf16 dense peak.
Each variant runs in its own subprocess so that peak memory and compile caches
belong to it alone.

    python benchmarks/model_step.py                      # CPU, small preset
    python benchmarks/model_step.py --device cuda        # ViT-B/16, 224 px, batch 256, bf16

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
GPU_VARIANTS = [
    "clip-ray eager", "openclip eager", "clip-ray compile", "clip-ray eager ckpt",
    "openclip compile", "clip-ray compile ckpt",
]


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
    impl, mode = args.variant.split()[:2]
    checkpointing = args.variant.endswith("ckpt")

    if impl == "clip-ray":
        model = build_model(config)
        if checkpointing:
            model.set_grad_checkpointing(True)
    else:
        model = build_openclip(config)
        if checkpointing:
            model.set_grad_checkpointing(True)
    model = model.to(device).train()
    step_model = torch.compile(model) if mode == "compile" else model

    loss_fn = ClipLoss()
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused)
    images = torch.randn(args.batch, 3, config.vision.image_size, config.vision.image_size, device=device)
    tokens = torch.randint(1, config.text.vocab_size, (args.batch, config.text.context_length), device=device)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]

    def step() -> float:
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
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default=None, help="default: vit-small-cpu on CPU, ViT-B/16 on CUDA")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CPU, 256 on CUDA")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32"])
    parser.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    parser.add_argument("--json-out", default=None, help="also write all results as JSON here")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("ViT-B/16" if cuda else "vit-small-cpu")
    args.batch = args.batch or (256 if cuda else 64)
    args.steps = args.steps or (20 if cuda else 10)
    args.precision = args.precision or ("bf16" if cuda else "fp32")

    if args.variant:
        print(json.dumps(run_variant(args)), flush=True)
        return

    variants = args.variants.split(",") if args.variants else (GPU_VARIANTS if cuda else CPU_VARIANTS)
    print(f"preset {args.preset}, batch {args.batch}, {args.precision}, {args.steps} timed steps "
          f"after {args.warmup} warm-up steps, device {args.device}, torch threads {os.cpu_count()}", flush=True)
    results = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--device", args.device, "--preset", args.preset,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--precision", args.precision]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant}: FAILED\n{proc.stderr[-2000:]}", flush=True)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        if args.json_out:  # after every variant, so a run cut short keeps what it measured
            Path(args.json_out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
        print(f"  {variant:24s} {r['samples_per_s']:9.1f} samples/s  peak {r['peak_mem_gib']:6.2f} GiB"
              + (f"  MFU {100 * r['mfu']:5.1f}%" if "mfu" in r else ""), flush=True)

    by_name = {r["variant"]: r for r in results}
    print("\nvariant                   samples/s   step ms   peak GiB   warm-up s   MFU     vs openclip (same mode)")
    for r in results:
        impl, mode_and_flags = r["variant"].split(maxsplit=1)
        ref = by_name.get(f"openclip {mode_and_flags}")  # like with like: same compile mode and checkpointing
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.2f}x" if ref and impl == "clip-ray" else ""
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        print(f"{r['variant']:24s} {r['samples_per_s']:10.1f} {r['step_ms']:9.1f} {r['peak_mem_gib']:10.2f} "
              f"{r['warmup_s']:11.1f}   {mfu:7s} {ratio}")


if __name__ == "__main__":
    main()
