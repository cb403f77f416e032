"""Ray Train's per-worker function: what each training worker process runs first.

The driver (clip_ray.driver.trainer) hands `train_worker` to the TorchTrainer;
Ray imports this module in every worker, so nothing here reaches into the driver.
"""

from __future__ import annotations

import logging
import sys

import ray.train
from ray.data import DataContext

from clip_ray.config import Config
from clip_ray.worker.context import RayTrainContext
from clip_ray.worker.loop import run_training

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_to_stdout(level: int = logging.INFO) -> None:
    """Sends clip_ray's log records to stdout once per process: in a Ray worker that is what Ray
    forwards to the driver, and so to `ray job logs`."""
    logger = logging.getLogger("clip_ray")
    logger.setLevel(level)
    if not any(getattr(handler, "clip_ray_stdout", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler.clip_ray_stdout = True
        logger.addHandler(handler)
        logger.propagate = False  # a root handler set up by someone else would print everything twice


def train_worker(loop_config: dict) -> dict:
    """TorchTrainer's per-worker function: the loop with its progress visible, returning its
    summary (Ray hands rank 0's to the driver as Result.return_value). The Config arrives
    as the driver prepared it (pickled whole), so the worker neither parses nor checks it."""
    log_to_stdout()
    config: Config = loop_config["config"]
    # Each epoch's stream would announce its execution plan in three lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    data_context = DataContext.get_current()
    if config.data.progress_log_every_s and ray.train.get_context().get_world_rank() == 0:
        # Not redrawn bars (each redraw a line in `ray job logs`), nor tqdm_ray's bars on the driver:
        # Ray Data's text summary, every RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL s (see build_trainer).
        # Rank 0 builds the stream, so a multi-worker split's coordinator inherits this context.
        data_context.use_ray_tqdm = False
        logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO)
    else:
        data_context.enable_progress_bars = False
    return run_training(config, RayTrainContext())
