"""Images/s of `clip-ray embed`, side by side with a plain PyTorch loop over the same photos and model, same cores.

Both embed the same Flickr8k photos (the first N of the test split, then the train
split; 128 px JPEGs upscaled to the model's input) with the same model, in float32
on the CPU, each image through the project's evaluation transform (decode, centre
square, bicubic resize, uint8) and CLIP normalisation, into unit vectors stored as
float16:

- the plain loop: a torch DataLoader over the image files (D worker processes decode,
  one torch thread each), the model in the main process with C torch threads;
- `clip-ray embed` (the driver function, in this process, on a local Ray started
  here with C + D logical CPUs): D read + decode tasks at a time (`decode_cpus=1`,
  one thread each) feed A encoder actors of C / A CPUs each (Ray gives each
  actor C / A torch threads); the job writes one Parquet file per partition.
  The pipeline keeps the two stages apart (A x C / A + 1 <= C + D CPUs), so each
  partition's file is written as soon as it is encoded.

C is --cpus (the machine's cores by default), D --decode-workers (default C): both
sides run C torch threads for the model plus D decoding processes on the same cores.

    python benchmarks/embed_throughput.py                          # ViT-B/32, 1000 photos, 1 and 2 actors
    python benchmarks/embed_throughput.py --preset vit-small-cpu --images 4000 --embed both

Images/s ("img/s") is over the whole run, from the call to its return: for the plain
loop the model loaded from the checkpoint, every image read, decoded and encoded; for
`clip-ray embed` everything the job does (resolving and hashing the model, planning,
starting its actors, each loading the model, writing the files) but not starting Ray,
nor Ray's first run in the process (worker processes), which a warm-up run pays first.
Each pipeline also runs on the first 4 batches of photos alone (one partition per
batch): "marginal img/s" is the extra photos of the full run over its extra seconds (the
rate once running), "fixed s" the small run's seconds that this rate does not explain
(start-up and tail: actors starting, model loads, the first and last batches).
Ray runs its workers at nice 15, so on a machine others are using they yield CPU to
those others and the plain loop does not: compare wall clock on an idle machine.
Images per CPU-second count every process involved (Ray's own included), which is
steadier than wall clock on a shared machine; "marginal" and "fixed" CPU seconds are
split the same way. The weights are a seeded random
initialisation of --preset, saved as a training checkpoint (throughput does not depend
on them); the tokenizer is a small BPE trained on the photos' captions. The last
line is the ratio for one actor per core and the goal, 0.9.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Self

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clip_ray.config import EmbedConfig, SourceConfig  # noqa: E402
from clip_ray.data.formats import Sample  # noqa: E402
from clip_ray.data.formats.folders import load_caption_csv  # noqa: E402
from clip_ray.data.stream.preprocess import Preprocessor, normalize_on_device  # noqa: E402
from clip_ray.inference.embedding_files import iter_vectors, list_embedding_files  # noqa: E402
from clip_ray.inference.encoder import EMBEDDING_COLUMNS  # noqa: E402
from clip_ray.model import build_model  # noqa: E402
from clip_ray.model.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402
from clip_ray.worker.checkpoint import (  # noqa: E402
    is_complete_checkpoint,
    load_model_from_checkpoint,
    save_training_state,
)

REPO = Path(__file__).resolve().parent.parent
FLICKR = REPO.parent / "shared" / "data" / "flickr8k"
GOAL = 0.9  # issue #13: clip-ray embed at >= 0.9x the plain loop's images/s, one actor per core
FULL_CSV, SMALL_CSV = "captions.csv", "small.csv"
SMALL_BATCHES = 4  # the small run: this many batches of photos, one partition each


# --------------------------------------------------------------------------- inputs, prepared once


def prepare_photos(out_dir: Path, count: int, small: int) -> Path:
    """A folder + captions CSV of `count` Flickr8k photos with one caption each (the first), and
    SMALL_CSV listing the first `small` of them; reused while it holds the same photos."""
    marker = out_dir / "done.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"images": count, "small": small}:
        return out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    (out_dir / "images").mkdir(parents=True)
    captions = load_caption_csv(FLICKR / "captions.csv")
    names = [line.strip() for split in ("test", "train")
             for line in (FLICKR / "splits" / f"{split}.txt").read_text().splitlines() if line.strip()]
    if count > len(names):
        raise SystemExit(f"--images {count}: Flickr8k has {len(names)} photos")
    rows = [(name, captions[name][0][0]) for name in names[:count]]
    for name, _ in rows:
        shutil.copyfile(FLICKR / "images" / name, out_dir / "images" / name)
    for file_name, chosen in ((FULL_CSV, rows), (SMALL_CSV, rows[:small])):
        with open(out_dir / file_name, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(["image", "caption"])
            writer.writerows(chosen)
    marker.write_text(json.dumps({"images": count, "small": small}))
    return out_dir


def prepare_model(out_dir: Path, preset: str, captions: list[str]) -> tuple[Path, Path]:
    """(a training checkpoint of `preset`, randomly initialised with seed 0; a BPE tokenizer of the captions)."""
    checkpoint = out_dir / f"model-{preset.replace('/', '-').replace('@', '-')}"
    tokenizer = out_dir / "tokenizer.json"
    if not is_complete_checkpoint(checkpoint):
        torch.manual_seed(0)
        model = build_model(preset)
        save_training_state(checkpoint, model=model, optimizer=torch.optim.AdamW(model.parameters()), step=0)
    vocab = min(1000, build_model(preset, device="meta").config.text.vocab_size)
    train_bpe_tokenizer(captions, vocab_size=vocab).save(tokenizer)
    return checkpoint, tokenizer


# --------------------------------------------------------------------------- CPU time


class CpuMeter:
    """CPU seconds of this process and every descendant while the block runs, polled every `every_s`:
    Ray's actors end with their job and are no child of ours to reap, so their time would be lost at
    exit (a process that ends loses at most its last `every_s` of CPU)."""

    def __init__(self, every_s: float = 0.1):
        self.every_s = every_s
        self.at_start: dict[tuple[int, float], float] = {}
        self.last: dict[tuple[int, float], float] = {}
        self.stopped = threading.Event()

    def _poll(self) -> dict[tuple[int, float], float]:
        me = psutil.Process()
        for process in [me, *me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                self.last[(process.pid, process.create_time())] = times.user + times.system
            except psutil.Error:  # ended in between
                continue
        return self.last

    def __enter__(self) -> Self:
        self.at_start = dict(self._poll())
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stopped.wait(self.every_s):
            self._poll()

    def __exit__(self, *_) -> None:
        self.stopped.set()
        self.thread.join()
        self._poll()

    @property
    def seconds(self) -> float:
        """Processes alive at the start count from there, later ones from their birth."""
        return sum(last - self.at_start.get(key, 0.0) for key, last in self.last.items())


# --------------------------------------------------------------------------- the plain PyTorch loop


class PhotoFiles(torch.utils.data.Dataset):
    """(uint8 HWC pixels, caption) of each photo, through the same transform as the job's decode tasks."""

    def __init__(self, captions_csv: Path, preprocessor: Preprocessor):
        self.images = captions_csv.parent / "images"
        self.rows = [(name, pairs[0][0]) for name, pairs in load_caption_csv(captions_csv).items()]
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        name, caption = self.rows[index]
        sample = Sample(key=name, image=(self.images / name).read_bytes(), caption=caption)
        return self.preprocessor.image(sample), caption


class Collate:
    """Stack to uint8 NCHW (+ tokenize the batch's captions) in the worker, as a decode task does."""

    def __init__(self, preprocessor: Preprocessor, with_text: bool):
        self.preprocessor, self.with_text = preprocessor, with_text

    def __call__(self, items):
        pixels = torch.from_numpy(np.stack([image for image, _ in items]).transpose(0, 3, 1, 2))
        tokens = self.preprocessor.text([caption for _, caption in items]) if self.with_text else None
        return pixels, tokens


@torch.no_grad()
def plain_pass(data_dir: Path, captions_file: str, checkpoint: Path, tokenizer: Path, args) -> dict:
    """The photos through a DataLoader and the model in this process: images, seconds, CPU seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.cpus)
    with CpuMeter() as cpu:
        start = time.perf_counter()
        model = load_model_from_checkpoint(checkpoint)
        config = model.config
        preprocessor = Preprocessor(config.vision.image_size, config.text.context_length,
                                    load_tokenizer(tokenizer, config.text.context_length), train=False,
                                    uint8_images=True)
        with_text = args.embed == "both"
        loader = torch.utils.data.DataLoader(PhotoFiles(data_dir / captions_file, preprocessor),
                                             batch_size=args.batch_size, num_workers=args.decode_workers,
                                             collate_fn=Collate(preprocessor, with_text))
        images, image_vectors, text_vectors = 0, [], []
        for pixels, tokens in loader:
            image_vectors.append(_unit_float16(model.encode_image(normalize_on_device(pixels))))
            if tokens is not None:
                text_vectors.append(_unit_float16(model.encode_text(torch.from_numpy(tokens))))
            images += len(pixels)
        seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return {"images": images, "seconds": seconds, "cpu": cpu.seconds, "vectors": np.concatenate(image_vectors)}


def largest_difference(plain_vectors: np.ndarray, out_dir: Path) -> float:
    """The largest difference between the plain loop's image vectors and those the job wrote (same order)."""
    files = list_embedding_files(str(out_dir))
    written = np.concatenate([v for path in files for v in iter_vectors(path, EMBEDDING_COLUMNS["image"])])
    if written.shape != plain_vectors.shape:
        raise SystemExit(f"{out_dir}: {written.shape} vectors, the plain loop made {plain_vectors.shape}")
    return float(np.abs(written.astype(np.float32) - plain_vectors.astype(np.float32)).max())


def _unit_float16(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features, dim=-1).numpy().astype(np.float16)


# --------------------------------------------------------------------------- clip-ray embed


def embed_pass(data_dir: Path, captions_file: str, out_dir: Path, checkpoint: Path, tokenizer: Path, actors: int,
               samples_per_partition: int, args) -> dict:
    """One `clip-ray embed` job through the driver function, every partition (re)done."""
    from clip_ray.driver.embed import embed

    config = EmbedConfig(output=str(out_dir), model=str(checkpoint), tokenizer=str(tokenizer),
                         source=SourceConfig(path=str(data_dir), format="csv", captions_file=captions_file),
                         embed=args.embed, dtype="float16", precision="fp32", batch_size=args.batch_size,
                         concurrency=actors, num_cpus_per_actor=args.cpus / actors, decode_cpus=1.0,
                         samples_per_partition=samples_per_partition, overwrite=True, progress_every_s=3600)
    with CpuMeter() as cpu:
        start = time.perf_counter()
        summary = embed(config)
        seconds = time.perf_counter() - start
    return {"images": summary["rows_embedded_now"], "seconds": seconds, "cpu": cpu.seconds}


# --------------------------------------------------------------------------- main


def summarise(full: dict, small: dict) -> dict:
    """Rates of one pipeline from its full and its small run (see the module docstring)."""
    extra_images, extra_seconds = full["images"] - small["images"], full["seconds"] - small["seconds"]
    extra_cpu = full["cpu"] - small["cpu"]
    marginal = extra_images / extra_seconds if extra_images > 0 and extra_seconds > 0 else None
    marginal_cpu = extra_images / extra_cpu if extra_images > 0 and extra_cpu > 0 else None
    return {"wall": full["images"] / full["seconds"], "marginal": marginal,
            "fixed_s": small["seconds"] - small["images"] / marginal if marginal else None,
            "per_cpu": full["images"] / full["cpu"] if full["cpu"] > 0 else None, "marginal_per_cpu": marginal_cpu,
            "fixed_cpu_s": small["cpu"] - small["images"] / marginal_cpu if marginal_cpu else None,
            "full": full, "small": small}


def number(value: float | None, width: int, digits: int = 1) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else "-".rjust(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="cores: torch threads on either side")
    parser.add_argument("--decode-workers", type=int, default=None,
                        help="DataLoader workers = read + decode tasks at a time (default: --cpus)")
    parser.add_argument("--actors", type=int, nargs="+", default=None,
                        help="encoder actor counts to measure (default: 1, 2 and --cpus)")
    parser.add_argument("--preset", default="ViT-B/32", help="model preset (random init; e.g. vit-small-cpu)")
    parser.add_argument("--images", type=int, default=1000, help="photos to embed (Flickr8k has 8,091)")
    parser.add_argument("--embed", choices=["image", "both"], default="image", help="towers (both: captions too)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per encoder call, both sides")
    parser.add_argument("--samples-per-partition", type=int, default=125, help="photos per output file (the job)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="passes per measurement, alternating; the best is kept (a shared machine is noisy)")
    parser.add_argument("--json-out", default=None, help="also write all results as JSON here")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "clip-ray-bench" / "embed"))
    args = parser.parse_args()
    args.decode_workers = args.decode_workers or args.cpus
    actors = sorted(set(args.actors or [1, 2, args.cpus]))
    small = SMALL_BATCHES * args.batch_size
    if args.images <= small:
        raise SystemExit(f"--images must be above {small} (the small run: {SMALL_BATCHES} x --batch-size)")

    import ray

    work = Path(args.work_dir)
    start = time.perf_counter()
    data_dir = prepare_photos(work / f"flickr8k-{args.images}", args.images, small)
    captions = [pairs[0][0] for pairs in load_caption_csv(data_dir / FULL_CSV).values()]
    checkpoint, tokenizer = prepare_model(work, args.preset, captions)
    print(f"{args.images} photos in {data_dir}, {args.preset} (random init, seed 0) in {checkpoint} "
          f"({time.perf_counter() - start:.1f} s to prepare or find)")
    load_before = os.getloadavg()
    print("load average before: " + " ".join(f"{x:.2f}" for x in load_before)
          + f" (1, 5, 15 min) on {os.cpu_count()} cores; measuring on {args.cpus}")

    ray.init(address="local", num_cpus=args.cpus + args.decode_workers, include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray", "clip_ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    embed_pass(data_dir, SMALL_CSV, work / "out-warm-up", checkpoint, tokenizer, max(actors), args.batch_size, args)
    print(f"Ray warm-up (the process's first Ray Data run: worker processes), {small} photos: "
          f"{time.perf_counter() - start:.1f} s, not counted")

    setups = {"plain": f"DataLoader x{args.decode_workers}, {args.cpus} torch threads"}
    setups.update({f"embed x{a}": f"{a} actor(s) x {args.cpus / a:g} CPU, {args.decode_workers} decode slots"
                   for a in actors})
    runs: dict[str, list[dict]] = {name: [] for name in setups}
    plain_vectors = None
    for repeat in range(args.repeats):
        for name in setups:
            passes = {}
            for size, captions_file, per_partition in (("small", SMALL_CSV, args.batch_size),
                                                       ("full", FULL_CSV, args.samples_per_partition)):
                if name == "plain":
                    run = plain_pass(data_dir, captions_file, checkpoint, tokenizer, args)
                    plain_vectors = run.pop("vectors")
                else:
                    a = int(name.split("x")[1])
                    run = embed_pass(data_dir, captions_file, work / f"out-{a}-{size}", checkpoint, tokenizer, a,
                                     per_partition, args)
                passes[size] = run
                print(f"pass {repeat + 1}/{args.repeats} {name:10s} {size:5s} {run['images']:5d} images in "
                      f"{run['seconds']:6.1f} s = {run['images'] / run['seconds']:6.1f} img/s, "
                      f"{run['cpu']:6.1f} CPU s", flush=True)
            runs[name].append(summarise(passes["full"], passes["small"]))
    ray.shutdown()
    differences = {a: largest_difference(plain_vectors, work / f"out-{a}-full") for a in actors}
    print("largest difference of a vector component, clip-ray embed against the plain loop (float16 unit vectors): "
          + ", ".join(f"{a} actor(s) {d:.1e}" for a, d in differences.items()))

    best = {name: {key: max((r[key] for r in found if r[key] is not None), default=None)
                   for key in found[0] if key not in ("full", "small")} for name, found in runs.items()}
    for name, found in runs.items():  # fixed costs: the least, as the rates are the most
        for key in ("fixed_s", "fixed_cpu_s"):
            best[name][key] = min((r[key] for r in found if r[key] is not None), default=None)
    print(f"\n{args.preset}, {args.images} Flickr8k photos, embed={args.embed}, batch {args.batch_size}, float32, "
          f"{args.cpus} cores, {args.decode_workers} decoding processes, best of {args.repeats}:")
    print(f"| {'pipeline':10s} | {'setup':42s} | img/s | vs plain | marginal img/s | fixed s "
          f"| img per CPU-s | marginal img per CPU-s | fixed CPU s |")
    print(f"| {'-' * 10} | {'-' * 42} | ----: | -------: | -------------: | ------: "
          f"| ------------: | ---------------------: | ----------: |")
    for name, rates in best.items():
        print(f"| {name:10s} | {setups[name]:42s} | {rates['wall']:5.1f} | "
              f"{rates['wall'] / best['plain']['wall']:7.2f}x | {number(rates['marginal'], 14)} | "
              f"{number(rates['fixed_s'], 7)} | {number(rates['per_cpu'], 13, 2)} | "
              f"{number(rates['marginal_per_cpu'], 22, 2)} | {number(rates['fixed_cpu_s'], 11)} |")
    load_after = os.getloadavg()
    print("load average after: " + " ".join(f"{x:.2f}" for x in load_after) + " (1, 5, 15 min)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "setups": setups, "load_before": load_before,
                                                   "load_after": load_after, "best": best, "runs": runs}, indent=2))
    per_core = f"embed x{args.cpus}"
    if per_core in best:
        ratio = best[per_core]["wall"] / best["plain"]["wall"]
        print(f"ratio ({args.cpus} actors, one per core) {ratio:.2f}x of the plain loop; goal >= {GOAL}: "
              f"{'met' if ratio >= GOAL else 'not met'}")
    else:
        print(f"ratio (one actor per core) not measured: --actors lacks {args.cpus}; goal >= {GOAL}: not checked")


if __name__ == "__main__":
    main()
