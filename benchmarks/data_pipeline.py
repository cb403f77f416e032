"""Images/s of clip-ray's Ray Data preprocessing, side by side with a torch DataLoader over `webdataset`.

Both read the same WebDataset shards (the Flickr8k train split: 7,091 photos,
35,455 captions), on the same number of CPU cores, through the same per-sample
work (draft JPEG decode, random-resized crop, bicubic resize, CLIP normalisation,
CLIP tokenization to 77 tokens) and the same shuffle buffer size, into batches of
256. The DataLoader's workers collate (stack + normalise) as Ray's tasks do.

    python benchmarks/data_pipeline.py                 # 2 cores, 64 and 224 px
    python benchmarks/data_pipeline.py --cpus 8 --sizes 224

It prints, per pipeline, wall-clock images/s (whole epoch and after the first
batch) and images per CPU-second (over every process involved, Ray's own
included: steadier than wall clock on a shared machine), the Ray / DataLoader
ratios, and the CPU cores per GPU that ViT-B/32 training would need (an H100 at
~40% MFU trains ViT-B/32 at about 9,000 samples/s). uint8 variants stop before
normalisation, which the GPU does. Ray Data's first run in a session (worker
processes, internal actors; once per job) is timed separately. `webdataset` and
`open_clip` (for CLIP's BPE merges file) come with the `bench` extra.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from clip_ray.config import DataConfig, SourceConfig  # noqa: E402
from clip_ray.data.formats import BadSample, Sample, ShardWriter, read_caption_csv  # noqa: E402
from clip_ray.data.stream.preprocess import Preprocessor, normalize  # noqa: E402
from clip_ray.model.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"
GPU_SAMPLES_PER_S = 9000  # ViT-B/32 on one H100 at ~40% MFU
CONTEXT_LENGTH = 77
# Each framework with float32 normalised output, and with uint8 output (normalised later, on the GPU).
PIPELINES = ["dataloader", "ray", "dataloader-uint8", "ray-uint8"]


def flickr_shards(out_dir: Path, samples_per_shard: int) -> list[str]:
    """The train split as WebDataset shards; a finished conversion (marked by done.json) is reused."""
    marker = out_dir / "done.json"
    if marker.is_file():
        return json.loads(marker.read_text())["shards"]
    with ShardWriter(out_dir, samples_per_shard=samples_per_shard) as writer:
        for s in read_caption_csv(FLICKR, split_file=FLICKR / "splits" / "train.txt"):
            writer.write(s.key, s.image, s.caption, meta=s.meta)
    shards = writer.close()
    marker.write_text(json.dumps({"shards": shards}))
    return shards


def clip_merges() -> str:
    import open_clip

    return str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")


def cpu_seconds() -> float:
    """CPU time of this process, its live descendants (Ray's raylet and workers; DataLoader workers) and its
    reaped children: on a shared machine, CPU per image is steadier than wall-clock images/s."""
    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:  # ended in between
            continue
        total += times.user + times.system
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + reaped.ru_utime + reaped.ru_stime


def drain(batches) -> dict:
    """One pass: images, wall seconds in total and after the first batch, CPU seconds."""
    cpu_start, start = cpu_seconds(), time.perf_counter()
    first = None
    images = 0
    for batch in batches:
        images += len(batch["image"])
        float(batch["image"][0, 0, 0, 0])  # touch the pixels, as a training step would
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"images": images, "seconds": end - start, "steady": max(end - (first or end), 1e-9),
            "cpu": cpu_seconds() - cpu_start}


# --------------------------------------------------------------------------- clip-ray on Ray Data


def ray_config(shard_dir: str, batch_size: int, shuffle: int, uint8: bool) -> DataConfig:
    return DataConfig(train=[SourceConfig(path=shard_dir)], tokenizer=clip_merges(), shuffle_buffer=shuffle,
                      uint8_images=uint8, preprocess_batch_size=batch_size)


def ray_pass(shard_dir: str, size: int, batch_size: int, shuffle: int, uint8: bool) -> dict:
    """One epoch through clip-ray's pipeline, as a world-size-1 worker takes it (uint8 stays uint8: the GPU
    would normalise it)."""
    from clip_ray.data.stream.batches import TrainBatches
    from clip_ray.data.stream.pipeline import build_train_dataset

    cfg = ray_config(shard_dir, batch_size, shuffle, uint8)
    dataset = build_train_dataset(cfg, size, CONTEXT_LENGTH, epoch=0)
    return drain(TrainBatches(dataset, batch_size, shuffle_buffer=shuffle, seed=0, epoch=0, normalize=False))


def ray_warm_up(shard: str, size: int) -> float:
    """Seconds for Ray Data's first run in a session (worker processes, internal actors), on one shard."""
    start = time.perf_counter()
    ray_pass(shard, size, 64, 0, False)
    return time.perf_counter() - start


# --------------------------------------------------------------------------- DataLoader over webdataset


class WdsTransform:
    """The same per-sample work as clip-ray's tasks: decode + crop + resize; bad images are dropped."""

    def __init__(self, size: int, crop_scale: tuple[float, float]):
        self.prepare = Preprocessor(size, CONTEXT_LENGTH, tokenize=None, train=True, crop_scale=crop_scale)

    def __call__(self, sample: dict):
        raw = Sample(key=sample["__key__"], image=sample["jpg"], caption=sample["txt"].decode("utf-8"),
                     source=sample["__url__"])
        try:
            return self.prepare.image(raw), raw.caption
        except BadSample:
            return None


class Collate:
    """Stack (+ normalise) + tokenize in the worker, as clip-ray does per task."""

    def __init__(self, tokenizer, uint8: bool):
        self.tokenizer = tokenizer
        self.uint8 = uint8

    def __call__(self, items):
        pixels = np.ascontiguousarray(np.stack([image for image, _ in items]).transpose(0, 3, 1, 2))
        return {"image": torch.from_numpy(pixels if self.uint8 else normalize(pixels)),
                "text": self.tokenizer([caption for _, caption in items], context_length=CONTEXT_LENGTH)}


def dataloader_pass(shards: list[str], size: int, batch_size: int, cpus: int, shuffle: int, uint8: bool) -> dict:
    import webdataset as wds

    dataset = (wds.WebDataset(shards, shardshuffle=len(shards), seed=0, empty_check=False)
               .shuffle(shuffle)
               .map(WdsTransform(size, DataConfig().crop_scale))
               .select(lambda item: item is not None))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=cpus,
                                         collate_fn=Collate(load_tokenizer(clip_merges()), uint8), drop_last=True)
    return drain(loader)


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=2, help="cores for either pipeline's workers")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shuffle", type=int, default=2048, help="shuffle buffer rows (both pipelines)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "clip-ray-bench"))
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes per pipeline, alternating; the best is kept (a shared machine is noisy)")
    parser.add_argument("--pipelines", nargs="+", default=PIPELINES, choices=PIPELINES)
    args = parser.parse_args()

    import ray

    shard_dir = Path(args.work_dir) / f"flickr8k-train-{args.samples_per_shard}"
    start = time.perf_counter()
    shards = flickr_shards(shard_dir, args.samples_per_shard)
    print(f"{len(shards)} shards in {shard_dir} ({time.perf_counter() - start:.1f} s to convert or find)")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"Ray Data warm-up (first run of the session, once per job): {ray_warm_up(shards[0], 64):.1f} s")

    for size in args.sizes:
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for name in args.pipelines:
                uint8 = name.endswith("uint8")
                if name.startswith("dataloader"):
                    run = dataloader_pass(shards, size, args.batch_size, args.cpus, args.shuffle, uint8)
                else:
                    run = ray_pass(str(shard_dir), size, args.batch_size, args.shuffle, uint8)
                rates = {"wall": run["images"] / run["seconds"], "steady": run["images"] / run["steady"],
                         "per_cpu": run["images"] / run["cpu"]}
                best[name] = {k: max(v, best.get(name, {}).get(k, 0.0)) for k, v in rates.items()}
                print(f"{size:4d} px  {name:16s}  {run['images']} images in {run['seconds']:6.1f} s: "
                      f"{rates['wall']:6.0f} img/s ({rates['steady']:.0f} after the first batch); "
                      f"{run['cpu']:6.1f} CPU s = {rates['per_cpu']:.0f} img per CPU s", flush=True)
        for out in ("", "-uint8"):
            ours, theirs = best.get(f"ray{out}"), best.get(f"dataloader{out}")
            if ours and theirs:
                print(f"{size:4d} px  ray{out} / dataloader{out}: " + ", ".join(
                    f"{what} {ours[what] / theirs[what]:.2f}" for what in ("wall", "steady", "per_cpu"))
                      + f" (best of {args.repeats})")
        if size == 224:
            for name in ("ray", "ray-uint8"):
                if name in best:
                    per_cpu = best[name]["per_cpu"]
                    print(f"ViT-B/32 at {GPU_SAMPLES_PER_S} samples/s per GPU, {name} at {per_cpu:.0f} img per "
                          f"CPU-second: ~{GPU_SAMPLES_PER_S / per_cpu:.0f} CPU cores per GPU (224 px)")
    ray.shutdown()


if __name__ == "__main__":
    main()
