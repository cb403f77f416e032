"""Peak memory of the accumulated step's loss against the batch, whole and in chunks of rows.

With accumulation the loss scores every local row against every global column
at once (clip_ray.loss, GradCache's step 2): its logits are local x global, so
with one process they grow with the square of the batch. `train.loss_chunk_rows`
runs forward and backward a chunk of rows at a time (backward_in_chunks): the
logits are chunk x global, and what the loss needs per row of the batch stays
flat once the batch is larger than the chunk.

Each point runs in a fresh process, which measures its peak resident memory
(ru_maxrss) over the loss's forward and backward on random unit features, less
what it held just before. One process means local = global; on N workers the
local rows shrink N-fold and the same per-row figures apply to chunk x global.

    python benchmarks/loss_memory.py                       # batches 1k..16k, whole vs chunks of 1024
    python benchmarks/loss_memory.py --batches 2048,4096 --chunk 512 --dim 768
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIB = 2 ** 20


def rss_now_mib() -> float:
    """Current resident memory of this process (Linux /proc), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def one_point(batch: int, dim: int, chunk: int | None, loss_kind: str) -> dict:
    """The loss step once, in this process; peak resident memory above the starting point."""
    import torch

    from clip_ray.loss import build_loss

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    texts = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(2.6593, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True) if loss_kind == "siglip" else None
    loss_fn = build_loss(loss_kind)
    loss_fn.backward_in_chunks(images[:8].detach().requires_grad_(), texts[:8].detach().requires_grad_(),
                               scale.exp(), bias)  # warm-up: the kernels' own allocations
    images.grad = texts.grad = scale.grad = None
    before = rss_now_mib()
    loss = loss_fn.backward_in_chunks(images, texts, scale.exp(), bias, chunk_rows=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"batch": batch, "chunk": chunk, "loss": float(loss), "peak_mib": max(0.0, peak - before)}


def run_point(batch: int, dim: int, chunk: int | None, loss_kind: str) -> dict:
    command = [sys.executable, __file__, "--point", json.dumps([batch, dim, chunk, loss_kind])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"point {batch}/{chunk} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1024,2048,4096,8192,16384", help="global batch sizes (one process)")
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_rows of the chunked side")
    parser.add_argument("--dim", type=int, default=512, help="embedding width (ViT-B/32: 512)")
    parser.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--point", default=None, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.point:
        print(json.dumps(one_point(*json.loads(args.point))))
        return
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    print(f"{args.loss} loss, features of width {args.dim}, float32, one process (local = global)")
    print(f"{'batch':>7} {'whole MiB':>10} {'chunks MiB':>11} {'whole /row KiB':>15} {'chunks /row KiB':>16}")
    for batch in batches:
        whole, chunked = (run_point(batch, args.dim, chunk, args.loss) for chunk in (None, args.chunk))
        assert abs(whole["loss"] - chunked["loss"]) <= 1e-4 * abs(whole["loss"]), (whole, chunked)
        rows.append({"batch": batch, "whole_mib": whole["peak_mib"], "chunks_mib": chunked["peak_mib"]})
        print(f"{batch:>7} {whole['peak_mib']:>10.0f} {chunked['peak_mib']:>11.0f} "
              f"{whole['peak_mib'] * 1024 / batch:>15.1f} {chunked['peak_mib'] * 1024 / batch:>16.1f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    beyond = [r for r in rows if r["batch"] >= 2 * args.chunk]
    if len(beyond) >= 2:
        first, last = beyond[0], beyond[-1]
        per_row = (last["chunks_mib"] / last["batch"]) / max(first["chunks_mib"] / first["batch"], 1e-9)
        whole_per_row = (last["whole_mib"] / last["batch"]) / max(first["whole_mib"] / first["batch"], 1e-9)
        print(f"chunked memory per batch row, batch {last['batch']} / batch {first['batch']}: ratio {per_row:.2f} "
              f"(goal <= 1.25: flat beyond the chunk size; whole: {whole_per_row:.2f})")


if __name__ == "__main__":
    main()
