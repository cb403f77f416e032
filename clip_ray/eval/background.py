"""Evaluation beside training (eval.mode: async): a Ray actor scores copies of the weights while
the workers train on.

A mid-run evaluation costs the training workers one copy of the weights into the
object store. The actor (created on first use with eval.async_num_cpus /
async_num_gpus) builds the model once and evaluates each copy it is sent, in
order, with a world-size-1 Evaluator. Results are collected without blocking;
ray.train.report is a collective, so rank 0 shares what finished with the
other ranks at points every rank reaches (the loop's log steps), and every rank
knows how many evaluations are outstanding without asking, so nothing is sent
while none are. An evaluation that fails or dies is a warning, never the end
of the run.
"""

from __future__ import annotations

import logging

import ray
import torch
from ray.exceptions import RayActorError, RayError
from torch import nn

from clip_ray.config import Config
from clip_ray.eval.evaluate import Evaluator
from clip_ray.eval.gather import broadcast_from_rank0
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer

log = logging.getLogger("clip_ray.eval.background")


@ray.remote(max_restarts=0)
class EvaluationActor:
    """Holds a model of config.model and an Evaluator; each call loads weights into it and evaluates."""

    def __init__(self, config: Config):
        gpu = config.eval.async_num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if gpu else "cpu")
        tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
        self.model = build_model(config.model).to(self.device)
        self.evaluator = Evaluator(config, tokenizer, self.device)

    def evaluate(self, state_dict: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.load_state_dict(state_dict)
        return self.evaluator(self.model)


class BackgroundEvaluations:
    """Every rank holds one; rank 0 also holds the actor and the evaluations in flight.

    `collect` is a collective while any evaluation is outstanding: every rank calls it at the same
    points and gets the same list.
    """

    def __init__(self, config: Config, rank: int, world_size: int):
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.outstanding = 0  # submitted and not yet delivered: the same count on every rank
        self._actor = None
        self._in_flight: list[tuple[dict, ray.ObjectRef | None]] = []  # rank 0: (position, result), in order

    def submit(self, model: nn.Module, position: dict) -> None:
        """Hands the model's current weights to the actor; `position` is where the loop stands now."""
        self.outstanding += 1
        if self.rank != 0:
            return
        try:
            weights = ray.put({name: value.detach().cpu() for name, value in model.state_dict().items()})
            result = self._ensure_actor().evaluate.remote(weights)
        except Exception as err:  # noqa: BLE001 - the run goes on without this evaluation
            log.warning("background evaluation at step %s not started: %s: %s", position.get("step"),
                        type(err).__name__, err)
            result = None
        self._in_flight.append((dict(position), result))

    def collect(self, wait_s: float = 0.0) -> list[tuple[dict, dict]]:
        """(metrics, position) of the evaluations finished by now, in step order; with wait_s > 0, waits up
        to that long for all of them and gives up on the rest (a warning each)."""
        if self.outstanding == 0:
            return []
        done = self._finished(wait_s) if self.rank == 0 else None
        done = broadcast_from_rank0(done)
        self.outstanding -= len(done)
        return [(metrics, position) for metrics, position in done if metrics]

    def close(self) -> None:
        """Stops the actor; evaluations not collected by now are dropped."""
        if self._actor is not None:
            ray.kill(self._actor)
            self._actor = None
        self._in_flight.clear()

    def _ensure_actor(self):
        if self._actor is None:
            cfg = self.config.eval
            # "DEFAULT": outside the training workers' placement group, whose bundles are theirs.
            self._actor = EvaluationActor.options(
                num_cpus=cfg.async_num_cpus, num_gpus=cfg.async_num_gpus, scheduling_strategy="DEFAULT",
            ).remote(self.config)
        return self._actor

    def _finished(self, wait_s: float) -> list[tuple[dict, dict]]:
        """Rank 0: the finished prefix of the evaluations in flight (all of them when wait_s > 0)."""
        refs = [result for _, result in self._in_flight if result is not None]
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=wait_s)[0]) if refs else set()
        done = []
        while self._in_flight:
            position, result = self._in_flight[0]
            if result is not None and result not in ready and not wait_s:
                break
            self._in_flight.pop(0)
            done.append((self._result(result, ready, position, wait_s), position))
        return done

    def _result(self, result, ready: set, position: dict, wait_s: float) -> dict:
        if result is None:
            return {}
        step = position.get("step")
        if result not in ready:
            log.warning("background evaluation of step %s not finished after %.0f s: left out", step, wait_s)
            return {}
        try:
            return ray.get(result)
        except RayError as err:
            if isinstance(err, RayActorError):
                self._actor = None  # the next evaluation starts a new one
            log.warning("background evaluation of step %s failed, training goes on: %s", step,
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
            return {}
