"""The per-worker training function: a plain function of the config.

Ray Train runs it on every worker through trainer.py's `_train_worker`; a test
can call `run_training` in-process with a `WorkerContext` (world size 1). One
pass of the loop is:

    epoch e: rank 0 builds the epoch's Ray Data stream (shard order seeded by
             (seed, e)), splits it and hands each rank its iterator
    each batch: TrainStep (DDP, global-batch loss, accumulation) -> log -> maybe
             evaluate (rank 0) -> maybe checkpoint (ray.train.report)

Exact resume: a checkpoint stores the step, the epoch and the number of batches
this epoch already consumed, plus every RNG. A resumed worker rebuilds the same
epoch stream and skips that many batches, so it continues with the batch that
would have come next.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from clip_ray.config import Config, ConfigError, to_dict
from clip_ray.data.formats import DataError, FailureCounts
from clip_ray.eval.evaluate import Evaluator
from clip_ray.loss import build_loss
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer
from clip_ray.tracking import tracker_for_rank
from clip_ray.train.checkpoint import (
    gather_rng_states, load_training_state, restore_training_state, save_training_state,
)
from clip_ray.train.context import WorkerContext
from clip_ray.train.optim import build_optimizer, lr_at, make_grad_scaler, set_lr
from clip_ray.train.step import TrainStep

log = logging.getLogger("clip_ray.train")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EpochData:
    """Each rank's batches of one epoch; rank 0 builds and splits the stream, then shares the pieces."""

    def __init__(self, config: Config, context: WorkerContext):
        from clip_ray.data.failure_tracker import FailureTracker

        self.config = config
        self.context = context
        self.batch_size = config.train.global_batch_size // context.world_size
        self.failures = FailureTracker() if context.rank == 0 else None

    def batches(self, epoch: int, skip_batches: int):
        from clip_ray.data.failure_tracker import train_stream
        from clip_ray.data.pipeline import build_train_dataset, split_for_workers, train_batches

        cfg, rank, world = self.config, self.context.rank, self.context.world_size
        pieces: list = [None] * world
        if rank == 0:
            dataset = build_train_dataset(cfg.data, cfg.model.vision.image_size, cfg.model.text.context_length,
                                          epoch, self.failures, train_stream(epoch))
            pieces = split_for_workers(dataset, world) if world > 1 else [dataset]
        if world > 1:  # the split's iterators are picklable handles on one coordinator
            dist.broadcast_object_list(pieces, src=0)
        return train_batches(pieces[rank], cfg.data, self.batch_size, epoch, rank, skip_batches,
                             device=self.context.device)

    def failure_counts(self, epoch: int, final: bool) -> dict[str, FailureCounts]:
        """Rank 0 only: counts per source; raises DataError when a source fails too often."""
        from clip_ray.data.failure_tracker import train_stream

        if self.failures is None:
            return {}
        return self.failures.check(train_stream(epoch), self.config.data.max_failure_fraction, final=final)


def _failure_metrics(counts: dict[str, FailureCounts]) -> dict[str, float]:
    total = sum(counts.values(), FailureCounts())
    return total.as_metrics(prefix="data/")


def run_training(config: Config, context: WorkerContext) -> dict:
    """Trains to config.train.steps (resuming from the context's latest checkpoint) and returns final metrics."""
    cfg, rank, device = config, context.rank, context.device
    _seed_everything(cfg.train.seed + rank)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.text.context_length)
    if tokenizer.vocab_size > cfg.model.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size={cfg.model.text.vocab_size}: the tokenizer {cfg.data.tokenizer} "
                          f"has {tokenizer.vocab_size} tokens")
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(model, cfg.train, cfg.model)
    scaler = make_grad_scaler(cfg.train.precision, device.type)

    # unique_samples: pairs of the first epoch seen so far (after it, the epoch's size).
    position = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples_seen": 0, "unique_samples": 0,
                "nonfinite_steps": 0}
    mlflow_run_id = None
    resume_dir = context.latest_checkpoint()
    if resume_dir is not None:
        state = load_training_state(resume_dir, map_location=device)
        restore_training_state(state, model, optimizer, scaler)
        position.update(state["data_position"])
        mlflow_run_id = state.get("mlflow_run_id")
        if rank == 0:
            log.info("resuming from %s at step %d (epoch %d, batch %d of the epoch)", resume_dir,
                     position["step"], position["epoch"], position["batches_in_epoch"])
    context.release()

    train_model = model
    if _distributed():
        device_ids = [device] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.train.compile:
        train_model = torch.compile(train_model, mode=cfg.train.compile_mode)
    step_fn = TrainStep(train_model, optimizer, build_loss(cfg.train.loss), scaler, cfg.train, device)
    step_fn.total_nonfinite = position["nonfinite_steps"]
    tracker = tracker_for_rank(rank, cfg.tracking, to_dict(cfg), resume_run_id=mlflow_run_id)
    evaluator = Evaluator(cfg, tokenizer, device) if rank == 0 else None
    data = EpochData(cfg, context)
    history: dict[str, dict] = {}

    has_eval_data = bool(cfg.data.val or cfg.data.zeroshot_dir)  # the same on every rank

    def evaluate(tag: str) -> dict:
        metrics = evaluator(model) if evaluator is not None else {}
        if metrics:
            tracker.log_metrics(metrics, position["step"])
            log.info("eval (%s) at step %d: %s", tag, position["step"],
                     ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        if _distributed():
            dist.barrier()
        if has_eval_data and tag.startswith("step-"):
            # Mid-run evaluations reach Ray too (no checkpoint): a sweep's scheduler ranks trials by them.
            context.report({**metrics, **position})
        history[tag] = metrics
        return metrics

    def checkpoint(metrics: dict) -> None:
        rng = gather_rng_states()
        directory = None
        if rank == 0:
            directory = Path(tempfile.mkdtemp(prefix="clip-ray-ckpt-"))
            save_training_state(directory, model=model, optimizer=optimizer, scaler=scaler, step=position["step"],
                                epoch=position["epoch"], samples_seen=position["samples_seen"],
                                data_position=dict(position), rng_states=rng, mlflow_run_id=tracker.run_id,
                                config=to_dict(cfg))
        context.report({**metrics, **position}, directory)

    if position["step"] == 0 and cfg.train.eval_every > 0:
        evaluate("before")

    per_step = cfg.train.global_batch_size
    last_loss = float("nan")
    last_log, last_log_step, started = time.perf_counter(), position["step"], time.perf_counter()
    try:
        while position["step"] < cfg.train.steps:
            consumed_this_epoch = 0
            for batch in data.batches(position["epoch"], position["batches_in_epoch"]):
                set_lr(optimizer, lr_at(position["step"], cfg.train))
                result = step_fn(batch["image"], batch["text"])
                consumed_this_epoch += 1
                position["batches_in_epoch"] += 1
                position["samples_seen"] += per_step
                if position["epoch"] == 0:
                    position["unique_samples"] += per_step
                position["nonfinite_steps"] = step_fn.total_nonfinite
                if result.skipped:
                    log.warning("non-finite loss at step %d: step skipped (%d in a row)",
                                position["step"], step_fn.consecutive_nonfinite)
                    continue
                position["step"] += 1
                step, last_loss = position["step"], result.loss
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    now = time.perf_counter()
                    rate = per_step * (step - last_log_step) / max(now - last_log, 1e-9)
                    eta = (cfg.train.steps - step) * per_step / max(rate, 1e-9)
                    metrics = {"train/loss": result.loss, "train/lr": optimizer.param_groups[0]["lr"],
                               "train/logit_scale": model.logit_scale.detach().exp().item(),
                               "train/samples_per_s": rate, "train/epoch": position["epoch"],
                               "train/nonfinite_steps": step_fn.total_nonfinite}
                    if result.grad_norm is not None:
                        metrics["train/grad_norm"] = result.grad_norm
                    metrics.update(_failure_metrics(data.failure_counts(position["epoch"], final=False)))
                    tracker.log_metrics(metrics, step)
                    if rank == 0:
                        log.info("step %d/%d epoch %d | loss %.4f | lr %.2e | %.1f samples/s | ETA %s",
                                 step, cfg.train.steps, position["epoch"], result.loss, metrics["train/lr"],
                                 rate, _duration(eta))
                    last_log, last_log_step = now, step
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                    evaluate(f"step-{step}")
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 \
                        and step < cfg.train.steps:
                    checkpoint({"train/loss": last_loss})
                if step >= cfg.train.steps:
                    break
            else:
                counts = data.failure_counts(position["epoch"], final=True)
                tracker.log_metrics({f"epoch/{k}": v for k, v in _failure_metrics(counts).items()},
                                    position["step"])
                if consumed_this_epoch == 0 and position["batches_in_epoch"] == 0:
                    raise DataError(f"epoch {position['epoch']} gave no full batch of "
                                    f"{per_step // context.world_size} pairs per worker")
                position["epoch"] += 1
                position["batches_in_epoch"] = 0
        final = evaluate("final")
        checkpoint({"train/loss": last_loss, **final})
        if rank == 0:
            size = cfg.model.vision.image_size
            example = (torch.randn(2, 3, size, size), tokenizer(["a photo", "a drawing"]))
            if cfg.tracking.log_model:
                tracker.log_model(model, example, tokenizer_path=cfg.data.tokenizer)
            tracker.log_figures()
            log.info("finished %d steps in %s", position["step"], _duration(time.perf_counter() - started))
        tracker.close("FINISHED", timeout_s=cfg.tracking.close_timeout_s)
    except BaseException:
        tracker.close("FAILED", timeout_s=min(10.0, cfg.tracking.close_timeout_s))
        raise
    return {"before": history.get("before", {}), "final": history.get("final", {}), **position,
            "mlflow_run_id": tracker.run_id}


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
