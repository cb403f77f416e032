"""The per-worker loop called in-process (world size 1) on real drawn demo shards.

A run stopped at a checkpoint and resumed ends bit-for-bit where the
uninterrupted run ends: the checkpoint carries optimiser, RNG and the position
inside the epoch, and the resumed stream skips exactly the consumed batches.
"""

from __future__ import annotations

import multiprocessing
import pickle
import shutil
from pathlib import Path

import pytest
import ray
import torch
import torch.multiprocessing as mp
from distributed_workers import training_worker
from mlflow import MlflowClient

from clip_ray.config import DemoDataConfig, load_config
from clip_ray.data.demo.synthetic import generate_demo_data
from clip_ray.data.formats import read_tar_shard
from clip_ray.model.tokenizer import train_bpe_tokenizer
from clip_ray.worker.checkpoint import find_latest_checkpoint, load_training_state
from clip_ray.worker.context import WorkerContext
from clip_ray.worker.loop import run_training


RAY_INIT_KWARGS = {"num_cpus": 2, "log_to_driver": False}  # for conftest's ray_cluster


def _demo(root: Path, num_train: int):
    dataset = generate_demo_data(root, DemoDataConfig(image_size=32, num_train=num_train, num_val=64,
                                                      num_zeroshot_per_class=4, samples_per_shard=80))
    captions = [s.caption for shard in dataset.train_shards for s in read_tar_shard(shard)]
    tokenizer = root / "tokenizer.json"
    train_bpe_tokenizer(captions, vocab_size=300).save(tokenizer)
    return root, dataset, tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ray_cluster):
    return _demo(tmp_path_factory.mktemp("demo"), num_train=480)


@pytest.fixture(scope="module")
def uneven_demo(tmp_path_factory, ray_cluster):
    """Five shards of 80 pairs and one of 40: two workers get three shards each, 240 and 200 pairs."""
    return _demo(tmp_path_factory.mktemp("uneven"), num_train=440)


def _config(demo, tmp_path, steps: int, **extra):
    root, dataset, tokenizer = demo
    overrides = [
        "model.preset=vit-tiny", "model.vision.image_size=32", "model.text.vocab_size=300",
        "model.text.context_length=24", "model.vision.layers=1", "model.text.layers=1",
        f"data.train=[{{path: '{root}/train'}}]", f"data.val=[{{path: '{root}/val'}}]",
        f"data.zeroshot_dir={dataset.zeroshot_dir}", f"data.tokenizer={tokenizer}", "data.shuffle_buffer=64",
        "eval.zeroshot_templates=demo", "eval.batch_size=32", f"train.steps={steps}",
        "train.global_batch_size=32", "train.warmup_steps=2", "train.log_every=1", "train.precision=fp32",
        f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "tracking.log_system_metrics=false",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    return load_config(None, overrides)


NO_EVALUATION_DATA = {"data.val": "[]", "data.zeroshot_dir": "null"}


def _final_weights(checkpoint_root: Path) -> dict:
    return load_training_state(find_latest_checkpoint(checkpoint_root))["model"]


def test_resume_mid_epoch_ends_exactly_where_the_uninterrupted_run_ends(demo, tmp_path):
    # 480 pairs / 32 = 15 batches an epoch: 20 steps cross an epoch boundary, and the
    # checkpoint at step 6 sits in the middle of epoch 0.
    config = _config(demo, tmp_path, steps=20, **{"train.eval_every": 0, "train.checkpoint_every": 6})
    whole = WorkerContext(checkpoint_root=tmp_path / "whole", keep_checkpoints=10)
    result = run_training(config, whole)
    assert result["step"] == 20 and result["epoch"] == 1 and result["batches_in_epoch"] == 5

    # The interrupted run: keep only the step-6 checkpoint, as if the worker died after it.
    resumed_root = tmp_path / "resumed"
    shutil.copytree(whole.checkpoint_root / "checkpoint_000000006", resumed_root / "checkpoint_000000006")
    state = load_training_state(resumed_root / "checkpoint_000000006")
    assert state["data_position"]["batches_in_epoch"] == 6 and state["step"] == 6
    resumed = WorkerContext(checkpoint_root=resumed_root, keep_checkpoints=10)
    result = run_training(config, resumed)
    assert result["step"] == 20

    expected, actual = _final_weights(whole.checkpoint_root), _final_weights(resumed_root)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name
    # The intermediate checkpoints after the restart match too (steps 12 and 18).
    for step in (12, 18):
        a = load_training_state(resumed_root / f"checkpoint_{step:09d}")["model"]
        b = load_training_state(whole.checkpoint_root / f"checkpoint_{step:09d}")["model"]
        assert all(torch.equal(a[n], b[n]) for n in b), step


def test_training_learns_and_reports_before_and_after(demo, tmp_path):
    config = _config(demo, tmp_path, steps=30, **{"train.eval_every": 15, "train.checkpoint_every": 0,
                                                 "train.lr": 2e-3, "model.vision.patch_size": 8})
    context = WorkerContext(checkpoint_root=tmp_path / "ckpt")
    result = run_training(config, context)
    before, final = result["before"], result["final"]
    assert final["val/num_images"] == 64 and final["zeroshot/num_images"] == 48
    assert final["zeroshot/chance_top1"] == pytest.approx(1 / 12)
    assert final["val/loss"] < before["val/loss"]
    assert result["mlflow_run_id"]
    # The driver's summary names the run's experiment too: the CLI's link to the run is built from it.
    logged = MlflowClient(config.tracking.tracking_uri).get_run(result["mlflow_run_id"])
    assert result["mlflow_experiment_id"] == logged.info.experiment_id
    # A clean run logs one data-failure metric, a flat zero: no all-zero chart per reason or per epoch.
    failure_metrics = {key for key in logged.data.metrics if key.startswith(("data/", "epoch/data/"))}
    assert failure_metrics == {"data/failures"} and logged.data.metrics["data/failures"] == 0
    # The final checkpoint went through the context with the final metrics.
    assert context.reported[-1]["step"] == 30 and "val/loss" in context.reported[-1]


def test_compiled_training_follows_the_eager_run(demo, tmp_path):
    """train.compile wraps the model in torch.compile with train.compile_mode; it changes speed, not the maths."""
    settings = {"train.eval_every": 0, "train.checkpoint_every": 0, "train.lr": 1e-3}
    compiled = {"train.compile": "true", "train.compile_mode": "max-autotune-no-cudagraphs"}
    weights, results = {}, {}
    for name, extra in {"eager": {}, "compiled": compiled}.items():
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()  # other tests in this process compiled graphs too
        context = WorkerContext(checkpoint_root=tmp_path / name)
        results[name] = run_training(_config(demo, tmp_path / name, steps=4, **settings, **extra), context)
        weights[name] = _final_weights(context.checkpoint_root)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (name == "compiled"), f"{name} run compiled {graphs} graphs"
    drift = max((weights["eager"][n] - weights["compiled"][n]).abs().max().item() for n in weights["eager"])
    assert drift < 1e-4, f"compiled weights drifted {drift} from eager"
    assert results["compiled"]["final"]["val/loss"] == pytest.approx(results["eager"]["final"]["val/loss"], rel=1e-4)


def _train_on_two_ranks(config, checkpoint_root: Path, tmp_path: Path) -> list[dict]:
    """run_training on two gloo ranks in their own processes (each with its own Ray Data stream)."""
    work = Path(tmp_path) / f"ranks-{checkpoint_root.name}"
    work.mkdir()
    (work / "config.pkl").write_bytes(pickle.dumps(config))
    multiprocessing.set_forkserver_preload(["distributed_workers"])
    mp.start_processes(training_worker, nprocs=2, join=True, start_method="forkserver",
                       args=(2, f"file://{work}/rendezvous", ray.get_runtime_context().gcs_address,
                             str(work / "config.pkl"), str(checkpoint_root), str(work)))
    return [pickle.loads((work / f"rank{rank}.pkl").read_bytes()) for rank in range(2)]


@pytest.mark.slow
def test_two_workers_end_epochs_together_and_resume_from_their_own_places(uneven_demo, tmp_path):
    """Shares of 240 and 200 pairs at 16 per worker and step: epoch 0 is 12 steps, the shorter share's.
    Resumed at the epoch's last step (12, where one worker still had pairs), two workers end bit for bit
    where the uninterrupted pair ends, each from its own place (a mid-window resume is
    test_resume_mid_epoch_ends_exactly_where_the_uninterrupted_run_ends, on one worker)."""
    # Nothing to evaluate (no validation or zero-shot data): what is compared is where each stream stands and the
    # weights, and the ranks start no evaluation pipelines at the end of each run.
    config = _config(uneven_demo, tmp_path, steps=16, **{"train.eval_every": 0, "train.checkpoint_every": 6,
                                                         "cluster.num_workers": 2, **NO_EVALUATION_DATA})
    whole = tmp_path / "whole"
    summaries = _train_on_two_ranks(config, whole, tmp_path)
    assert [(s["step"], s["epoch"], s["batches_in_epoch"]) for s in summaries] == [(16, 1, 4)] * 2
    at_epoch_end = load_training_state(whole / "checkpoint_000000012")["data_position"]
    assert at_epoch_end["epoch"] == 0 and at_epoch_end["batches_in_epoch"] == 12
    # Each worker's own place: one has used its share up to the last full batch, the other has not.
    streams = at_epoch_end["streams"]
    assert len(streams) == 2 and streams[0] != streams[1]

    expected = _final_weights(whole)
    for step in (12,):
        resumed = tmp_path / f"resumed-{step}"
        name = f"checkpoint_{step:09d}"
        shutil.copytree(whole / name, resumed / name)
        summaries = _train_on_two_ranks(config, resumed, tmp_path)
        assert all(s["step"] == 16 and s["epoch"] == 1 for s in summaries)
        actual = _final_weights(resumed)
        assert all(torch.equal(actual[n], expected[n]) for n in expected), step


@pytest.mark.slow
def test_two_fsdp_workers_evaluate_in_the_background(uneven_demo, tmp_path):
    """eval.mode async on two ranks that shard the model (train.strategy fsdp): rank 0's actor scores a
    gathered copy of step 4's weights while both train on, both ranks take its result together (a
    collective report), and MLflow has it at step 4 between the two sync evaluations, which also run on
    gathered copies (each rank's share of the evaluation differs in length)."""
    config = _config(uneven_demo, tmp_path, steps=8, **{"train.eval_every": 4, "train.checkpoint_every": 0,
                                                        "cluster.num_workers": 2, "eval.mode": "async",
                                                        "eval.async_num_cpus": 0.5, "train.strategy": "fsdp"})
    summaries = _train_on_two_ranks(config, tmp_path / "ckpt", tmp_path)
    assert [s["step"] for s in summaries] == [8, 8]
    run_id = summaries[0]["mlflow_run_id"]
    history = MlflowClient(config.tracking.tracking_uri).get_metric_history(run_id, "zeroshot/top1")
    assert sorted(m.step for m in history) == [0, 4, 8]
    assert summaries[0]["final"]["zeroshot/num_images"] == 48


def test_a_run_from_pretrained_weights_with_a_locked_image_tower(demo, tmp_path):
    """model.init_from + model.lock_image through the real loop: the run starts from the source's weights (the
    driver prepares them), the locked image tower ends bit-identical to the source, the text tower moves."""
    from clip_ray.config import to_dict
    from clip_ray.driver.init_weights import prepare_initial_weights
    from clip_ray.model import build_model

    config = _config(demo, tmp_path, steps=3, **{"train.checkpoint_every": 0, "train.lr": 2e-3,
                                                "model.lock_image": "true"})
    torch.manual_seed(77)
    source = build_model(config.model).state_dict()
    torch.save({"state_dict": source, "model_config": to_dict(config.model)}, tmp_path / "pretrained.pt")
    config.model.init_from = str(tmp_path / "pretrained.pt")
    config.cluster.storage_path = str(tmp_path / "storage")
    prepare_initial_weights(config)
    result = run_training(config, WorkerContext(checkpoint_root=tmp_path / "ckpt"))
    final = _final_weights(tmp_path / "ckpt")
    image = [key for key in source if key.startswith("visual.")]
    assert image and all(torch.equal(final[key], source[key]) for key in image)
    moved = [key for key in source if key not in image and not torch.equal(final[key], source[key])]
    assert "text_projection" in moved and "transformer.resblocks.0.attn.in_proj_weight" in moved
    logged = MlflowClient(config.tracking.tracking_uri).get_run(result["mlflow_run_id"]).data
    assert logged.metrics["model/locked_params"] == sum(source[key].numel() for key in image)
    assert logged.tags["clip_ray.init_from"] == str(tmp_path / "pretrained.pt")
