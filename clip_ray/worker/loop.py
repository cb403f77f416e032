"""The per-worker training function: a plain function of the config.

Ray Train runs it on every worker through clip_ray.worker.entry.train_worker; a
test can call `run_training` in-process with a `WorkerContext` (world size 1).
One pass of the loop is:

    epoch e: rank 0 plans the epoch (unit order seeded by (seed, e)); each rank
             streams its share of the units through Ray Data (epoch_data)
    each batch: train_step (DDP or FSDP, global-batch loss, accumulation; the ranks also
             agree whether all have another batch) -> log_step ->
             maybe evaluate (every rank its share; or, with eval.mode async, hand
             the weights to a background actor) -> maybe checkpoint (ray.train.report)

Exact resume: a checkpoint stores the DataPosition (step, epoch, batches this
epoch already consumed), every rank's place in its stream, and every RNG. A
resumed worker restarts its stream from its place without reading the units it
had finished, so it continues with the batch that would have come next.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from clip_ray.config import Config, to_dict
from clip_ray.data.formats import DataError, FailureCounts
from clip_ray.eval.background import BackgroundEvaluations
from clip_ray.eval.evaluate import Evaluator
from clip_ray.loss import build_loss
from clip_ray.model import CLIP, build_model
from clip_ray.model.initial_weights import fit_initial_weights, load_initial_weights, read_prepared_weights
from clip_ray.model.locking import lock_towers
from clip_ray.model.tokenizer import Tokenizer, load_tokenizer
from clip_ray.tracking.tracker import NullTracker, tracker_for_rank
from clip_ray.worker.checkpoint import (
    gather_rng_states, load_training_state, restore_training_state, save_training_state,
)
from clip_ray.worker.context import WorkerContext
from clip_ray.worker.epoch_data import EpochData
from clip_ray.worker.optim import build_optimizer, lr_at, make_grad_scaler, set_lr
from clip_ray.worker.position import DataPosition
from clip_ray.worker.sharding import full_model_copy, full_state_dicts, wrap_for_training
from clip_ray.worker.step import StepResult, TrainStep

log = logging.getLogger("clip_ray.train")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _failure_metrics(counts: dict[str, FailureCounts]) -> dict[str, float]:
    """data/failures, the samples skipped in all, and data/<reason> for each reason that happened: a dozen
    all-zero charts per run would bury the training curves, so a clean run shows one flat zero."""
    total = sum(counts.values(), FailureCounts())
    by_reason = {f"data/{reason}": n for reason, n in sorted(total.failed.items()) if n}
    return {"data/failures": total.num_failed, **by_reason}


@dataclass
class WorkerRun:
    """What the loop's named steps share: one worker's model, optimiser, tracker and position."""

    config: Config
    context: WorkerContext
    model: CLIP  # unwrapped (under FSDP: sharded in place); what is evaluated, saved and logged
    optimizer: torch.optim.Optimizer
    step_fn: TrainStep
    tokenizer: Tokenizer
    tracker: NullTracker
    evaluator: Evaluator  # every rank's: a sharded evaluation is a collective
    data: EpochData
    position: DataPosition
    background: BackgroundEvaluations | None = None  # eval.mode async: the mid-run evaluations
    history: dict[str, dict] = field(default_factory=dict)
    last_result: StepResult | None = None  # of the last step applied
    started: float = field(default_factory=time.perf_counter)
    last_log_time: float = field(default_factory=time.perf_counter)
    last_log_step: int = 0

    @property
    def last_loss(self) -> float:
        return self.last_result.loss if self.last_result is not None else math.nan


def run_training(config: Config, context: WorkerContext) -> dict:
    """Trains to config.train.steps (resuming from the context's latest checkpoint); returns the summary."""
    steps = config.train.steps
    _seed_everything(config.train.seed + context.rank)
    run = start_run(config, context)
    position = run.position
    try:
        if position.step == 0 and config.train.eval_every > 0:
            evaluate(run, "before")
        run.last_log_time, run.last_log_step = time.perf_counter(), position.step
        while position.step < steps:
            train_epoch(run)
        report_background(run, wait_s=config.eval.async_wait_s)  # nothing outstanding is lost
        final = evaluate(run, "final")
        checkpoint(run, {"train/loss": run.last_loss, **final})
        finish(run)
    except BaseException:
        if run.background is not None:
            run.background.close()
        run.tracker.close("FAILED", timeout_s=min(10.0, config.tracking.close_timeout_s))
        raise
    return {"before": run.history.get("before", {}), "final": run.history.get("final", {}),
            **position.as_dict(), "mlflow_run_id": run.tracker.run_id,
            "mlflow_experiment_id": run.tracker.experiment_id}


def train_epoch(run: WorkerRun) -> None:
    """The rest of the current epoch, or up to train.steps; evaluations and checkpoints when due."""
    config, position = run.config, run.position
    for batch, has_next_batch in run.data.batches(position.epoch):
        result = train_step(run, batch, has_next_batch)
        if not result.skipped:
            if position.step % config.train.log_every == 0 or position.step == config.train.steps:
                log_step(run)
                report_background(run)
            if position.step == config.train.steps:
                return
            if _due(position.step, config.train.eval_every):
                evaluate(run, f"step-{position.step}")
            if _due(position.step, config.train.checkpoint_every):
                checkpoint(run, {"train/loss": run.last_loss})
        if not result.more:  # some rank's share is used up: the epoch ends here for every rank
            break
    end_epoch(run)


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def start_run(config: Config, context: WorkerContext) -> WorkerRun:
    """Model, optimiser and position: fresh, or restored exactly from the latest checkpoint."""
    device = context.device
    tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
    resume_dir = context.latest_checkpoint()
    model = build_model(config.model)
    if resume_dir is None and config.model.init_from:  # a resumed run has its own weights
        initial = fit_initial_weights(read_prepared_weights(config.model.init_from), config.model,
                                      config.model.init_from_towers)[0]
        load_initial_weights(model, initial, config.model.init_from_towers)
        if context.rank == 0:
            log.info("initialised the %s tower(s) from %s", config.model.init_from_towers, config.model.init_from)
    # Before the wrap and the optimiser: frozen parameters join neither the all-reduce nor the optimiser.
    locks = lock_towers(model, config.model)
    if context.rank == 0 and (config.model.lock_image or config.model.lock_text):
        log.info("%s", locks)
    model = model.to(device)
    # DDP wraps the model; FSDP shards it in place, so the optimiser is built on the sharded parameters.
    train_model = wrap_for_training(model, config.train.strategy, device, config.train.precision)
    optimizer = build_optimizer(model, config.train, config.model)
    scaler = make_grad_scaler(config.train.precision, device.type)
    position, mlflow_run_id, data = DataPosition(), None, EpochData(config, context)
    if resume_dir is not None:
        # Mapped, not read: every rank needs the whole state (full state dicts), and a node's ranks share it.
        state = load_training_state(resume_dir, map_location="cpu", mmap=True)
        restore_training_state(state, model, optimizer, scaler)
        position = DataPosition.from_dict(state["data_position"])
        data.restore(state["data_position"])
        mlflow_run_id = state.get("mlflow_run_id")
        if context.rank == 0:
            log.info("resuming from %s at step %d (epoch %d, batch %d of the epoch)", resume_dir,
                     position.step, position.epoch, position.batches_in_epoch)
        del state
    context.release()

    if config.train.compile:
        train_model = torch.compile(train_model, mode=config.train.compile_mode)
    step_fn = TrainStep(train_model, optimizer, build_loss(config.train.loss), scaler, config.train, device)
    step_fn.total_nonfinite = position.nonfinite_steps
    tracker = tracker_for_rank(context.rank, config.tracking, to_dict(config), resume_run_id=mlflow_run_id)
    if resume_dir is None:  # once per run: a resumed run keeps its locks (a change is warned about on restore)
        tracker.log_metrics({"model/trainable_params": locks.trainable_params,
                             "model/locked_params": locks.locked_params}, position.step)
    evaluator = Evaluator(config, tokenizer, device, rank=context.rank, world_size=context.world_size)
    background = None
    if config.eval.mode == "async":
        background = BackgroundEvaluations(config, context.rank, context.world_size)
    return WorkerRun(config=config, context=context, model=model, optimizer=optimizer, step_fn=step_fn,
                     tokenizer=tokenizer, tracker=tracker, evaluator=evaluator, data=data,
                     position=position, background=background)


def train_step(run: WorkerRun, batch: dict, has_next_batch: bool = True) -> StepResult:
    """One optimiser step at the scheduled learning rate; a non-finite one is skipped, not counted."""
    position = run.position
    set_lr(run.optimizer, lr_at(position.step, run.config.train))
    result = run.step_fn(batch["image"], batch["text"], has_next_batch)
    position.consume_batch(run.config.train.global_batch_size, run.step_fn.total_nonfinite)
    if result.skipped:
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", position.step,
                    run.step_fn.consecutive_nonfinite)
    else:
        position.step += 1
        run.last_result = result
    return result


def log_step(run: WorkerRun) -> None:
    """The step's training metrics to MLflow (rank 0) and a progress line with throughput and ETA."""
    config, position, result = run.config, run.position, run.last_result
    per_step, now = config.train.global_batch_size, time.perf_counter()
    rate = per_step * (position.step - run.last_log_step) / max(now - run.last_log_time, 1e-9)
    eta = (config.train.steps - position.step) * per_step / max(rate, 1e-9)
    metrics = {"train/loss": result.loss, "train/lr": run.optimizer.param_groups[0]["lr"],
               "train/logit_scale": run.model.logit_scale.detach().exp().item(),
               "train/samples_per_s": rate, "train/epoch": position.epoch,
               "train/nonfinite_steps": run.step_fn.total_nonfinite}
    if result.grad_norm is not None:
        metrics["train/grad_norm"] = result.grad_norm
    metrics.update(_failure_metrics(run.data.failure_counts(position.epoch, final=False)))
    run.tracker.log_metrics(metrics, position.step)
    if run.context.rank == 0:
        log.info("step %d/%d epoch %d | loss %.4f | lr %.2e | %.1f samples/s | ETA %s", position.step,
                 config.train.steps, position.epoch, result.loss, metrics["train/lr"], rate, _duration(eta))
    run.last_log_time, run.last_log_step = now, position.step


def evaluate(run: WorkerRun, tag: str) -> dict:
    """Every rank evaluates its share, rank 0 gets the metrics; mid-run results also reach Ray (a sweep's
    scheduler ranks trials by them). In async mode a mid-run evaluation only starts here."""
    config, position = run.config, run.position
    has_eval_data = bool(config.data.val or config.data.zeroshot_dir)  # the same on every rank
    mid_run = tag.startswith("step-")
    if mid_run and run.background is not None:
        if has_eval_data:
            run.background.submit(full_model_copy(run.model), position.as_dict())
        return {}
    metrics = run.evaluator(full_model_copy(run.model) if has_eval_data else run.model)
    _record_evaluation(run, tag, position.step, metrics)
    if has_eval_data and mid_run:
        run.context.report({**metrics, **position.as_dict()})
    return metrics


def report_background(run: WorkerRun, wait_s: float = 0.0) -> None:
    """Async mode: the background evaluations finished by now (waiting up to wait_s for all), logged at
    their own steps and reported by every rank together (ray.train.report is a collective)."""
    if run.background is None:
        return
    for metrics, at in run.background.collect(wait_s):
        _record_evaluation(run, f"step-{at['step']}", at["step"], metrics)
        run.context.report({**metrics, **at})


def _record_evaluation(run: WorkerRun, tag: str, step: int, metrics: dict) -> None:
    if metrics:
        run.tracker.log_metrics(metrics, step)
        log.info("eval (%s) at step %d: %s", tag, step, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
    run.history[tag] = metrics


def checkpoint(run: WorkerRun, metrics: dict) -> None:
    """Every rank's RNGs and stream place gathered, rank 0 writes the checkpoint, every rank reports it
    (collective)."""
    position = run.position
    rng = gather_rng_states()
    data_position = {**position.as_dict(), **run.data.positions(position.epoch)}
    state_dicts = full_state_dicts(run.model, run.optimizer)
    directory = None
    if run.context.rank == 0:
        # Every metric logged so far reaches MLflow before this checkpoint can be resumed from: a restart
        # (a lost node, a stopped job) replays only the steps after it, so none before it goes missing.
        run.tracker.flush_metrics(timeout_s=10.0)
        directory = Path(tempfile.mkdtemp(prefix="clip-ray-ckpt-"))
        save_training_state(directory, model=run.model, optimizer=run.optimizer, scaler=run.step_fn.scaler,
                            step=position.step, epoch=position.epoch, samples_seen=position.samples_seen,
                            data_position=data_position, rng_states=rng, mlflow_run_id=run.tracker.run_id,
                            config=run.config, state_dicts=state_dicts)
    run.context.report({**metrics, **position.as_dict()}, directory)


def end_epoch(run: WorkerRun) -> None:
    """The epoch's failure counts logged (a source failing too often raises DataError); on to the next."""
    position = run.position
    counts = run.data.failure_counts(position.epoch, final=True)
    failures = _failure_metrics(counts)
    if failures["data/failures"]:  # an epoch's exact tally, logged when there is one (absent: none)
        run.tracker.log_metrics({f"epoch/{k}": v for k, v in failures.items()}, position.step)
    if position.batches_in_epoch == 0:
        raise DataError(f"epoch {position.epoch} gave no full batch of {run.data.batch_size} pairs "
                        "to every worker (each worker reads its own share of the epoch's shards)")
    position.next_epoch()
    run.data.next_epoch()


def finish(run: WorkerRun) -> None:
    """Rank 0 logs the model and the figures; every rank closes its tracker."""
    config = run.config
    model = full_model_copy(run.model) if config.tracking.log_model else None  # every rank: a collective
    if run.context.rank == 0:
        size = config.model.vision.image_size
        example = (torch.randn(2, 3, size, size), run.tokenizer(["a photo", "a drawing"]))
        if model is not None:
            run.tracker.log_model(model, example, tokenizer_path=config.data.tokenizer)
        run.tracker.log_figures()
        log.info("finished %d steps in %s", run.position.step, _duration(time.perf_counter() - run.started))
    if run.background is not None:
        run.background.close()
    run.tracker.close("FINISHED", timeout_s=config.tracking.close_timeout_s)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
