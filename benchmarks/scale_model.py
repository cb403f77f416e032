"""Scale model of the two target runs: ViT-B/32 on 64 H100s and ViT-L/14 on 256, both at a 32,768 global batch.

Why: to size a cluster (CPU cores per GPU, network, object store) and to choose eval_every and
checkpoint_every before renting one. Every figure is a formula over the named constants below (each says
whether it was measured, and where, or assumed) and over the model presets, whose parameters and forward
FLOPs `clip_ray.model.stats` counts on the meta device (no memory, no arithmetic). Run (a) is
configs/vit-b32-cluster.yaml as it stands; run (b) is the same file with a ViT-L/14 on 256 workers.
The README's "Scale model" section shows this script's output.

    python benchmarks/scale_model.py               # also times torch.save of ~600 MB here (~10 s)
    python benchmarks/scale_model.py --no-measure  # uses SAVE_BYTES_PER_S_DEFAULT instead
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from clip_ray.config import Config, load_config  # noqa: E402
from clip_ray.eval.templates import load_templates  # noqa: E402
from clip_ray.model.clip import build_model  # noqa: E402
from clip_ray.model.stats import model_stats  # noqa: E402
from clip_ray.worker.checkpoint import capture_rng_state  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRESET_FILE = REPO / "configs" / "vit-b32-cluster.yaml"
RUNS = {  # name -> overrides of the preset file
    "(a) ViT-B/32, 64 GPUs": [],
    "(b) ViT-L/14, 256 GPUs": ["model.preset=ViT-L/14", "cluster.num_workers=256"],
}

# ----------------------------------------------------------------------------------------------- constants
# assumed: H100 SXM bf16 dense peak (NVIDIA's datasheet), the figure benchmarks/model_step.py divides by.
PEAK_FLOPS = 989e12
# measured: clip-ray ViT-B/16, torch.compile, batch 256, bf16, one H200 (benchmarks/results/model_step_h200.json);
# assumed to carry over to B/32 (shorter sequences: likely lower) and L/14 (wider: likely higher) on H100s.
MFU = 0.367
# measured: benchmarks/data_pipeline.py, Ray Data, 224 px, float32 out, Flickr8k JPEGs, 2-core box (README).
IMAGES_PER_CPU_S_F32 = 450.0
# derived from the same README paragraph: "about 13 [cores per GPU] with uint8 out" at 9,000 samples/s.
IMAGES_PER_CPU_S_U8 = 9000 / 13
# measured: benchmarks/loss_memory.py, whole loss at batch 16,384 peaked at 324.7 KiB per row: bytes per logit.
LOSS_PEAK_BYTES_PER_LOGIT = 324.7 * 1024 / 16384
# measured: torch.save + fsync of 600 MB into tempfile's directory, this script's median of 3 writes, in six runs
# on the shared 2-core box: 348, 394, 596, 613, 615 and 631 MB/s (single writes 322 to 651 MB/s).
SAVE_BYTES_PER_S_DEFAULT = 600e6
# assumed: object store (S3, GCS) bandwidth of one writer or one reader.
STORE_BYTES_PER_S = 1e9
# assumed: 400 Gbit/s of network per GPU (one NDR InfiniBand or EFA share per H100).
NET_BYTES_PER_S = 50e9
# assumed: an 8 x H100 node with 192 vCPUs (AWS p5.48xlarge): 24 per GPU, of which cpus_per_worker train.
NODE_CPUS_PER_GPU = 192 / 8
# Features reach the gather as float32 (under CUDA autocast F.normalize's norm runs in float32, and the quotient
# follows); DDP all-reduces the float32 gradients of float32 parameters (bf16 is autocast only); AdamW keeps
# float32 weights and two float32 moments.
FEATURE_BYTES, GRAD_BYTES, ADAMW_BYTES_PER_PARAM = 4, 4, 12
# Fused AdamW keeps one float32 "step" tensor per parameter tensor; a CUDA generator state is 16 bytes.
STEP_COUNTER_BYTES, CUDA_RNG_BYTES = 4, 16
# ImageNet's classes; the zero-shot prompts are classes x templates (eval.zeroshot_templates).
ZEROSHOT_CLASSES = 1000
# train.loss_chunk_rows to show when the preset sets none.
EXAMPLE_CHUNK_ROWS = 128
MB, MIB = 1e6, 2 ** 20


@dataclass
class Model:
    """What the formulas need from a preset."""
    params: int
    tensors: int
    embed_dim: int
    flops_image: float
    flops_text: float


def describe_model(config: Config) -> Model:
    """Parameter and FLOP counts of the preset (meta device: a second or two, whatever the size)."""
    stats = model_stats(config.model)
    meta = build_model(config.model, device="meta")
    return Model(params=stats["params_total"], tensors=sum(1 for _ in meta.parameters()),
                 embed_dim=config.model.embed_dim, flops_image=stats["flops_image"], flops_text=stats["flops_text"])


def rng_bytes_per_rank() -> int:
    """One rank's entry of the checkpoint's rng_states, serialised (plus the CUDA generator a GPU rank adds)."""
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    return len(buffer.getvalue()) + (0 if torch.cuda.is_available() else CUDA_RNG_BYTES)


def measure_save_bytes_per_s(total_bytes: float = 600e6, repeats: int = 3) -> float:
    """torch.save + fsync throughput as checkpoint.py writes (a temp file in tempfile's directory); the median."""
    state = {f"t{i}": torch.full((2 ** 20,), 1.0) for i in range(int(total_bytes / 4 / 2 ** 20))}
    rates = []
    with tempfile.TemporaryDirectory(prefix="clip-ray-save-") as directory:
        path = os.path.join(directory, "state.pt")
        for _ in range(repeats):
            start = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            rates.append(os.path.getsize(path) / (time.perf_counter() - start))
            os.remove(path)
    print(f"torch.save + fsync, {total_bytes / MB:.0f} MB: " + ", ".join(f"{r / MB:.0f}" for r in rates) + " MB/s")
    return sorted(rates)[len(rates) // 2]


def scale_model(config: Config, model: Model, save_bytes_per_s: float, rng_bytes: int) -> list[tuple[str, str]]:
    """(label, value) rows of one run, in the README's order and with the README's formulas."""
    W = config.cluster.num_workers
    G = config.train.global_batch_size
    B = G // W  # local rows
    P, D = model.params, model.embed_dim
    sustained = MFU * PEAK_FLOPS
    rows: list[tuple[str, str]] = []

    def row(label: str, value: float | str, fmt: str = ",.0f") -> None:
        rows.append((label, value if isinstance(value, str) else format(value, fmt)))

    # Compute: fwd + bwd = 3 x forward.
    fwd = model.flops_image + model.flops_text
    step_flops = 3 * fwd * B
    step_s = step_flops / sustained
    per_gpu = B / step_s
    row("parameters (M)", P / 1e6, ",.1f")
    row("forward GFLOP per sample (image + text)", fwd / 1e9, ",.2f")
    row("- of which image tower", model.flops_image / 1e9, ",.2f")
    row("local batch B = G / W", B)
    row("step TFLOP per GPU = 3 x fwd x B", step_flops / 1e12, ",.1f")
    row(f"step time at {MFU:.1%} MFU (ms)", step_s * 1e3, ",.1f")
    row("samples/s per GPU", per_gpu)
    row("samples/s, cluster", per_gpu * W)
    row(f"{config.train.steps:,} steps (hours)", config.train.steps * step_s / 3600, ",.1f")

    # Communication per step.
    gathered = G * D * 2 * FEATURE_BYTES
    gather_in = (W - 1) / W * gathered
    grads = P * GRAD_BYTES
    allreduce = 2 * (W - 1) / W * grads
    row("features gathered = G x D x 2 x 4 B (MB)", gathered / MB)
    row("- per GPU, all-gather (fwd) + reduce-scatter (bwd) (MB)", 2 * gather_in / MB)
    gather_ms = 2 * gather_in / NET_BYTES_PER_S * 1e3
    row(f"- both at {NET_BYTES_PER_S / 1e9:.0f} GB/s per GPU, not overlapped (ms)", gather_ms, ",.1f")
    row("- added to the step's compute time (%)", 100 * gather_ms / (step_s * 1e3), ".1f")
    row("DDP gradients = P x 4 B (MB)", grads / MB)
    row("- per GPU, ring all-reduce 2(W-1)/W x size (MB)", allreduce / MB)
    row(f"- all-reduce at {NET_BYTES_PER_S / 1e9:.0f} GB/s per GPU (ms)", allreduce / NET_BYTES_PER_S * 1e3, ",.1f")
    row("- backward it overlaps = 2/3 of the step (ms)", 2 / 3 * step_s * 1e3, ",.1f")
    row("- network that hides it in the backward (GB/s per GPU)", allreduce / (2 / 3 * step_s) / 1e9, ",.1f")

    # Loss memory.
    chunk = min(config.train.loss_chunk_rows or EXAMPLE_CHUNK_ROWS, B)
    row("logits, whole = B x G x 4 B x 2 (MiB)", B * G * 4 * 2 / MIB)
    example = "" if config.train.loss_chunk_rows else ", example"
    row(f"logits, chunks of {chunk} rows{example} = chunk x G x 4 B x 2 (MiB)", chunk * G * 4 * 2 / MIB)
    row(f"loss peak, whole, at the measured {LOSS_PEAK_BYTES_PER_LOGIT:.1f} B per logit (MiB)",
        B * G * LOSS_PEAK_BYTES_PER_LOGIT / MIB)

    # Checkpoint: rank 0 writes it locally, then ray.train.report uploads it (SYNC: every rank waits).
    size = ADAMW_BYTES_PER_PARAM * P + STEP_COUNTER_BYTES * model.tensors + rng_bytes * W
    save_s = size / save_bytes_per_s
    upload_s = size / STORE_BYTES_PER_S
    between_s = config.train.checkpoint_every * step_s
    row("checkpoint = 12 B x P + step counters + RNG x W (GB)", size / 1e9, ",.2f")
    row(f"- local torch.save at {save_bytes_per_s / MB:.0f} MB/s (s)", save_s, ",.1f")
    row(f"- upload at {STORE_BYTES_PER_S / 1e9:.0f} GB/s (s)", upload_s, ",.1f")
    row(f"- training between checkpoints, every {config.train.checkpoint_every:,} steps (s)", between_s, ",.1f")
    blocked_s = save_s + upload_s
    row("- share of wall time spent checkpointing (%)", 100 * blocked_s / (between_s + blocked_s), ".1f")
    row("- the same with checkpoint_every 5,000 (%)", 100 * blocked_s / (5000 * step_s + blocked_s), ".1f")

    # Evaluation every eval_every steps: zero-shot over N images and classes x templates prompts.
    N = config.eval.max_zeroshot_images
    prompts = ZEROSHOT_CLASSES * len(load_templates(config.eval.zeroshot_templates))
    image_flops, text_flops = N * model.flops_image, prompts * model.flops_text
    interval_s = config.train.eval_every * step_s
    # Sharded (sync): each rank decodes N / W images in its own process, on one core, float32 out.
    blocking_s = N / W / IMAGES_PER_CPU_S_F32 + (image_flops + text_flops) / W / sustained
    # Async: one actor does all of it on one GPU and, as the Evaluator reads images, one core.
    actor_gpu_s = (image_flops + text_flops) / sustained
    actor_s = N / IMAGES_PER_CPU_S_F32 + actor_gpu_s
    row(f"zero-shot images N; prompts {ZEROSHOT_CLASSES} x templates", f"{N:,}; {prompts:,}")
    row("- image tower N x fwd_image (PFLOP)", image_flops / 1e15, ",.2f")
    row("- text tower prompts x fwd_text (PFLOP)", text_flops / 1e15, ",.2f")
    row(f"training between evaluations, every {config.train.eval_every:,} steps (s)", interval_s)
    row("sync: pass = N/W / img-per-s + FLOPs / W / sustained (s)", blocking_s, ",.2f")
    row("- GPU-seconds idle per evaluation = pass x W", blocking_s * W)
    row("- share of training time (%)", 100 * blocking_s / (interval_s + blocking_s), ".2f")
    row("async: actor pass, one core decoding (s)", actor_s)
    row("- of which the actor's GPU is busy (s)", actor_gpu_s, ",.1f")
    row("- actor's extra GPU, share of the cluster's (%)", 100 / W, ".2f")

    # Resume: load model + optimiser; refill one shuffle window per rank before the first step.
    window = config.data.shuffle_buffer
    cpus_available = NODE_CPUS_PER_GPU - config.cluster.cpus_per_worker
    cores_u8 = per_gpu / IMAGES_PER_CPU_S_U8
    row(f"resume: read the checkpoint at {STORE_BYTES_PER_S / 1e9:.0f} GB/s per reader (s)", size / STORE_BYTES_PER_S,
        ",.1f")
    row(f"- re-decode {window:,} rows (shuffle window) at {cpus_available:.0f} CPUs per GPU, uint8 (s)",
        window / (cpus_available * IMAGES_PER_CPU_S_U8), ",.2f")
    row("- the same at just enough cores for the GPU (s)", window / per_gpu, ",.2f")

    # Preprocessing: samples/s per GPU / images per CPU-second.
    row("CPU cores per GPU, float32 out", per_gpu / IMAGES_PER_CPU_S_F32, ",.1f")
    row("CPU cores per GPU, uint8 out (the preset's)", cores_u8, ",.1f")
    row(f"- spare CPUs per GPU on the assumed node ({NODE_CPUS_PER_GPU:.0f} - cpus_per_worker)", cpus_available,
        ",.0f")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-measure", action="store_true",
                        help=f"skip timing torch.save; use {SAVE_BYTES_PER_S_DEFAULT / MB:.0f} MB/s")
    args = parser.parse_args()
    save_rate = SAVE_BYTES_PER_S_DEFAULT if args.no_measure else measure_save_bytes_per_s()
    rng = rng_bytes_per_rank()
    columns: dict[str, list[tuple[str, str]]] = {}
    for name, overrides in RUNS.items():
        config = load_config(PRESET_FILE, overrides)
        columns[name] = scale_model(config, describe_model(config), save_rate, rng)
    labels = [label for label, _ in next(iter(columns.values()))]
    print(f"\nMFU {MFU:.1%} of {PEAK_FLOPS / 1e12:.0f} TFLOP/s; global batch from {PRESET_FILE.name}; "
          f"RNG state {rng:,} B per rank\n")
    print("| quantity | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---:" for _ in columns) + " |")
    for i, label in enumerate(labels):
        print(f"| {label} | " + " | ".join(column[i][1] for column in columns.values()) + " |")


if __name__ == "__main__":
    main()
