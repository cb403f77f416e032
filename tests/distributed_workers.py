"""Worker bodies for the multi-process loss tests, in a module so spawned processes can import them.

Spawned children re-import functions by module name, so these cannot live in
a test file's local scope. Each worker writes its results to `out_dir`; the
test (the parent process) compares them with a one-process reference.
"""

from __future__ import annotations

import contextlib
import datetime
import pickle
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.eval.evaluate import Evaluator
from clip_ray.eval.gather import gather_rows
from clip_ray.loss import ClipLoss, build_loss
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.worker.context import WorkerContext
from clip_ray.worker.loop import run_training

GLOBAL_BATCH = 8
MODEL_SEED = 0


def tiny_model(loss_kind: str) -> torch.nn.Module:
    """The real CLIP at toy size, in float64 so gradient comparisons can be tight; SigLIP adds a bias."""
    config = ModelConfig(
        embed_dim=16,
        vision=VisionConfig(width=32, layers=1, image_size=16, patch_size=8, head_width=16),
        text=TextConfig(width=32, layers=1, vocab_size=64, context_length=8, head_width=16),
        init_logit_bias=-10.0 if loss_kind == "siglip" else None,
    )
    torch.manual_seed(MODEL_SEED)
    return build_model(config).double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The same images and captions (some padded short) in every process."""
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(GLOBAL_BATCH, 3, 16, 16, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, 64, (GLOBAL_BATCH, 8), generator=g)
    for row, length in enumerate(torch.randint(3, 9, (GLOBAL_BATCH,), generator=g).tolist()):
        tokens[row, length:] = 0  # pad id
    return images, tokens


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: None if p.grad is None else p.grad.detach().clone() for name, p in model.named_parameters()}


def gradcache_step(model, loss_fn, images, tokens, micro_batch: int) -> torch.Tensor:
    """The GradCache recipe from clip_ray/loss.py's docstring, with DDP's gradient mean done by hand."""
    starts = range(0, images.shape[0], micro_batch)
    with torch.no_grad():
        cached = [model(images[i:i + micro_batch], tokens[i:i + micro_batch]) for i in starts]
    image_cache = torch.cat([c.image_features for c in cached]).requires_grad_()
    text_cache = torch.cat([c.text_features for c in cached]).requires_grad_()
    loss = loss_fn(image_cache, text_cache, model.logit_scale.exp(), model.logit_bias)
    loss.backward()  # feature gradients for the cache, plus the temperature's (and bias') own
    for i in starts:
        out = model(images[i:i + micro_batch], tokens[i:i + micro_batch])
        torch.autograd.backward([out.image_features, out.text_features],
                                [image_cache.grad[i:i + micro_batch], text_cache.grad[i:i + micro_batch]])
    for p in model.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    return loss


def loss_equivalence_worker(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """One DDP step per loss on this rank's slice, and one GradCache step; saves losses and averaged gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        images, tokens = global_batch()
        rows = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
        results = {}
        # "clip_local_only" scores each slice alone: the control the gathered loss must differ from.
        for name, loss_fn in [("clip", build_loss("clip")), ("siglip", build_loss("siglip")),
                              ("clip_local_only", ClipLoss(gather=False))]:
            model = DistributedDataParallel(tiny_model(name.split("_")[0]))
            loss = loss_fn(*model(images[rows], tokens[rows]))
            loss.backward()  # DDP averages the gradients over ranks here
            results[name] = {"loss": loss.item(), "grads": gradients(model.module)}
        for name in ("clip", "siglip"):
            model = tiny_model(name)
            loss = gradcache_step(model, build_loss(name), images[rows], tokens[rows], micro_batch=1)
            results[f"gradcache_{name}"] = {"loss": loss.item(), "grads": gradients(model)}

        # Unequal local batches: every rank must get the same clear error, none may hang.
        features = torch.randn(2 + (rank == 0), 16)
        try:
            ClipLoss()(features, features, torch.tensor(1.0))
            results["unequal_error"] = None
        except ValueError as err:
            results["unequal_error"] = str(err)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _ray_rank(rank: int, world_size: int, rendezvous: str, ray_address: str, timeout_s: int):
    """This process as one rank of a gloo group, connected to the test's Ray; both closed after."""
    torch.set_num_threads(1)
    ray.init(address=ray_address, log_to_driver=False, logging_level="WARNING")
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield
    finally:
        dist.destroy_process_group()
        ray.shutdown()


def sharded_eval_worker(rank: int, world_size: int, rendezvous: str, ray_address: str, job_file: str,
                        out_dir: str) -> None:
    """Evaluates the pickled (config, weights) as one rank of a gloo group, twice (the validation split is
    made once and iterated again); saves rank 0's metrics, the rows each rank encoded, and a gather of
    rows of unequal lengths (rank r sends r rows: rank 0 none)."""
    with _ray_rank(rank, world_size, rendezvous, ray_address, timeout_s=120):
        job = pickle.loads(Path(job_file).read_bytes())
        config = job["config"]
        model = build_model(config.model)
        model.load_state_dict(job["weights"])
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
        evaluator = Evaluator(config, tokenizer, torch.device("cpu"), rank=rank, world_size=world_size)
        metrics = [evaluator(model) for _ in range(2)]
        rows = gather_rows(torch.full((rank, 3), float(rank)))
        result = {"metrics": metrics, "encoded": dict(evaluator.encoded), "gathered": rows}
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def training_worker(rank: int, world_size: int, rendezvous: str, ray_address: str, config_file: str,
                    checkpoint_root: str, out_dir: str) -> None:
    """Trains the pickled Config as one rank of a gloo group (resuming from checkpoint_root's latest
    checkpoint, as a restarted Ray Train worker would); saves the loop's summary."""
    with _ray_rank(rank, world_size, rendezvous, ray_address, timeout_s=300):
        config = pickle.loads(Path(config_file).read_bytes())
        context = WorkerContext(checkpoint_root=Path(checkpoint_root), keep_checkpoints=10, rank=rank,
                                world_size=world_size)
        summary = run_training(config, context)
        (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps(summary))
