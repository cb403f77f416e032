"""Sharded evaluation gives one worker's metrics; async evaluation does not hold training back.

Real drawn demo data (JPEG shards, an ImageFolder of 48 zero-shot images), the real
tiny CLIP, real gloo process groups connected to this module's Ray cluster, and a
real in-process training run with an MLflow sqlite store.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle

import pytest
import ray
import torch
import torch.multiprocessing as mp
from distributed_workers import sharded_eval_worker
from mlflow import MlflowClient
from train_job_helpers import tiny_config, write_config

from clip_ray.config import ConfigError, DemoDataConfig, load_config
from clip_ray.data.demo.synthetic import generate_demo_data
from clip_ray.data.formats import read_tar_shard
from clip_ray.eval.evaluate import Evaluator
from clip_ray.model import build_model
from clip_ray.model.tokenizer import load_tokenizer, train_bpe_tokenizer
from clip_ray.worker.checkpoint import load_training_state
from clip_ray.worker.context import WorkerContext
from clip_ray.worker.loop import run_training

RAY_INIT_KWARGS = {"num_cpus": 4, "log_to_driver": False}  # for conftest's ray_cluster
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

NUM_VAL, NUM_ZEROSHOT = 64, 48  # 12 demo classes x 4


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_cluster):
    """Demo data in shards of 16 pairs, so the validation stream has blocks to split."""
    root = tmp_path_factory.mktemp("demo")
    dataset = generate_demo_data(root, DemoDataConfig(image_size=32, num_train=480, num_val=NUM_VAL,
                                                      num_zeroshot_per_class=4, samples_per_shard=16))
    captions = [s.caption for shard in dataset.train_shards for s in read_tar_shard(shard)]
    tokenizer = root / "tokenizer.json"
    train_bpe_tokenizer(captions, vocab_size=384).save(tokenizer)
    return root, dataset, tokenizer


def _config(demo, tmp_path, steps: int = 1, **sections):
    root, dataset, tokenizer = demo
    data = {"tokenizer": str(tokenizer), "train": [{"path": str(root / "train")}],
            "val": [{"path": str(root / "val")}], "zeroshot_dir": str(dataset.zeroshot_dir)}
    sections = {"data": data, **sections, "eval": {"batch_size": 16, **sections.get("eval", {})}}
    raw = tiny_config(tmp_path / "runs", "eval", steps, f"sqlite:///{tmp_path}/mlflow.db", **sections)
    return load_config(write_config(raw, tmp_path / "job.yaml"))


def _evaluate_alone(config, weights) -> dict:
    model = build_model(config.model)
    model.load_state_dict(weights)
    tokenizer = load_tokenizer(config.data.tokenizer, config.model.text.context_length)
    return Evaluator(config, tokenizer, torch.device("cpu"))(model)


def _assert_same_metrics(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in ("zeroshot/top1", "zeroshot/top5", "zeroshot/num_images", "val/num_images", "val/num_captions"):
        assert actual[name] == expected[name], name
    for name in expected:
        if name.startswith("val/"):
            assert actual[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-6), name


@pytest.fixture(scope="module")
def job(demo, tmp_path_factory):
    """A tiny model with random weights (the point is agreement, not accuracy), and its one-worker metrics."""
    tmp_path = tmp_path_factory.mktemp("job")
    config = _config(demo, tmp_path)
    torch.manual_seed(0)
    weights = build_model(config.model).state_dict()
    job_file = tmp_path / "job.pkl"
    job_file.write_bytes(pickle.dumps({"config": config, "weights": weights}))
    return job_file, _evaluate_alone(config, weights)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world_size", [3])  # an odd world: 64 pairs split 22/21/21, unequal gathers
def test_sharded_evaluation_equals_one_worker_and_splits_the_work(job, world_size, tmp_path):
    job_file, alone = job
    assert alone["zeroshot/num_images"] == NUM_ZEROSHOT and alone["val/num_captions"] == NUM_VAL
    assert "val/loss" in alone and 0 < alone["zeroshot/top5"]

    multiprocessing.set_forkserver_preload(["distributed_workers"])
    mp.start_processes(sharded_eval_worker, nprocs=world_size, join=True, start_method="forkserver",
                       args=(world_size, f"file://{tmp_path}/rendezvous", ray.get_runtime_context().gcs_address,
                             str(job_file), str(tmp_path)))
    ranks = [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(world_size)]

    for metrics in ranks[0]["metrics"]:  # the second pass re-reads the same split
        _assert_same_metrics({k: v for k, v in metrics.items() if k != "eval/seconds"},
                             {k: v for k, v in alone.items() if k != "eval/seconds"})
    assert all(metrics == {} for r in ranks[1:] for metrics in r["metrics"])
    # Each rank decoded and encoded its share only: every world-th zero-shot image, part of the pairs.
    zeroshot = [r["encoded"]["zeroshot"] for r in ranks]
    assert zeroshot == [len(range(rank, NUM_ZEROSHOT, world_size)) for rank in range(world_size)]
    val = [r["encoded"]["val"] for r in ranks]
    assert sum(val) == NUM_VAL and all(0 < n < NUM_VAL for n in val), val
    # Rows of unequal lengths (rank r sent r rows) arrive whole and in rank order.
    expected = torch.cat([torch.full((r, 3), float(r)) for r in range(world_size)])
    assert all(torch.equal(r["gathered"], expected) for r in ranks)


def _mid_run_reports(reported: list[dict]) -> list[tuple[int, dict]]:
    """(index, report) of the mid-run evaluations: they carry metrics and no training loss."""
    return [(i, r) for i, r in enumerate(reported) if "zeroshot/top1" in r and "train/loss" not in r]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_async_evaluation_reports_at_the_evaluated_steps_while_training_goes_on(demo, tmp_path):
    config = _config(demo, tmp_path, steps=30, train={"eval_every": 10, "checkpoint_every": 1},
                     eval={"mode": "async", "async_num_cpus": 1})
    context = WorkerContext(checkpoint_root=tmp_path / "ckpt", keep_checkpoints=50)
    result = run_training(config, context)
    assert result["step"] == 30 and result["before"] and result["final"]

    mid_run = _mid_run_reports(context.reported)
    assert [r["step"] for _, r in mid_run] == [10, 20]
    for index, report in mid_run:
        # Checkpoints of later steps were reported before the evaluation came back: training did not wait.
        steps_before = [r["step"] for r in context.reported[:index] if "train/loss" in r]
        assert max(steps_before) > report["step"], (report["step"], steps_before)
        assert report["samples_seen"] == report["step"] * config.train.global_batch_size
        # The actor scored the weights of the evaluated step, not those of the step it finished at.
        weights = load_training_state(tmp_path / "ckpt" / f"checkpoint_{report['step']:09d}")["model"]
        _assert_same_metrics({k: v for k, v in report.items() if k.startswith(("val/", "zeroshot/"))},
                             {k: v for k, v in _evaluate_alone(config, weights).items()
                              if k.startswith(("val/", "zeroshot/"))})

    client = MlflowClient(config.tracking.tracking_uri)
    for name in ("val/loss", "zeroshot/top1"):
        history = client.get_metric_history(result["mlflow_run_id"], name)
        assert sorted(m.step for m in history) == [0, 10, 20, 30], name
    logged = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], "val/loss")}
    assert logged[10] == pytest.approx(mid_run[0][1]["val/loss"])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_async_evaluator_that_never_starts_does_not_stop_the_run(demo, tmp_path, caplog):
    """A GPU the cluster lacks: the actor never starts; the run waits eval.async_wait_s at the end, warns,
    and finishes with its sync evaluations."""
    config = _config(demo, tmp_path, steps=6, train={"eval_every": 3, "checkpoint_every": 0},
                     eval={"mode": "async", "async_num_gpus": 1, "async_wait_s": 1})
    context = WorkerContext(checkpoint_root=tmp_path / "ckpt")
    with caplog.at_level(logging.WARNING, logger="clip_ray.eval.background"):
        result = run_training(config, context)
    assert result["step"] == 6 and result["final"]
    assert _mid_run_reports(context.reported) == []
    assert "background evaluation of step 3 not finished after 1 s" in caplog.text


@pytest.mark.parametrize("setting, key", [
    ("eval.mode=later", "eval.mode"), ("eval.async_num_cpus=-1", "eval.async_num_cpus"),
    ("eval.async_num_gpus=-0.5", "eval.async_num_gpus"), ("eval.async_wait_s=0", "eval.async_wait_s"),
])
def test_async_settings_are_checked(setting, key):
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["data.train=[{path: x}]", "data.tokenizer=t.json", setting])
    message = str(raised.value)
    assert message.startswith(key) and "\n" not in message
