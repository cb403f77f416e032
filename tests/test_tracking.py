"""MLflow tracking against real stores: a local SQLite store, and a real `mlflow server` that is
down when training starts and goes away again in the middle of the run."""

from __future__ import annotations

import getpass
import inspect
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import ray  # noqa: F401  the tracker runs in a Ray worker, where ray's bundled psutil feeds system metrics
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from PIL import Image

from clip_ray.config import (
    Config, DataConfig, DemoDataConfig, ModelConfig, SourceConfig, TextConfig, TrackingConfig, VisionConfig, to_dict,
)
from clip_ray.model import build_model
from clip_ray.tracking.figures import plot_history
from clip_ray.tracking.run import flatten_params, mlflow_run_link, resolve_tracking_uri, source_tags
from clip_ray.tracking.tracker import NullTracker, Tracker, mlflow_metric_name

MLFLOW_BIN = Path(sys.executable).parent / "mlflow"
TINY = ModelConfig(embed_dim=24, text=TextConfig(context_length=16, vocab_size=100, width=32, layers=2, head_width=16),
                   vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, head_width=16))


def tiny_run_config() -> dict:
    sources = [SourceConfig(path="/data/a/{00000..00009}.tar"), SourceConfig(path="/data/b", format="parquet")]
    return to_dict(Config(model=TINY, data=DataConfig(train=sources), demo=DemoDataConfig()))


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)


def timed(call, *args, **kwargs) -> float:
    start = time.monotonic()
    call(*args, **kwargs)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory) -> Path:
    """An empty store whose tables exist: creating them costs ~10 s, copying costs nothing."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def store_copy(migrated_db: Path, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(migrated_db, directory / "mlflow.db"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """`mlflow server` as a child process that can be killed (SIGKILL, like a crash) and restarted."""

    def __init__(self, port: int, db: Path, artifacts: Path, log: Path):
        self.port, self.db, self.artifacts, self.log = port, db, artifacts, log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts)]
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # no job runner: starts faster
        with self.log.open("a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        wait_for(self.healthy, 90, f"mlflow server on port {self.port} (log: {self.log})")

    def healthy(self) -> bool:
        assert self.process.poll() is None, f"mlflow server exited; log:\n{self.log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the uvicorn worker goes too
            self.process.wait()


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(metric.step for metric in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- a local store


LOAD_IN_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch, mlflow.pytorch
    model_uri, data_path, out_path = sys.argv[1:]
    model = mlflow.pytorch.load_model(model_uri)
    data = torch.load(data_path, weights_only=True)
    outputs = model(data["images"], data["tokens"])
    torch.save([t.detach() for t in outputs], out_path)
""")


@pytest.mark.timeout(300)
def test_local_store_records_the_whole_job(migrated_db, tmp_path):
    uri = f"sqlite:///{store_copy(migrated_db, tmp_path / 'store')}"
    client = MlflowClient(uri)
    sweep_experiment = client.create_experiment("sweep", artifact_location=(tmp_path / "store" / "mlruns").as_uri())
    parent = client.create_run(sweep_experiment, run_name="sweep-parent")
    run_config = tiny_run_config() | {"notes": "n" * 7000}  # longer than MLflow's 6000-character limit
    config = TrackingConfig(tracking_uri=uri, experiment="elsewhere", run_name="trial-0",
                            parent_run_id=parent.info.run_id, register_as="tiny-clip",
                            tags=source_tags("train"))  # as prepare_job sets them on the driver
    tracker = Tracker(config, run_config, flush_interval_s=0.2, system_metrics_interval_s=0.2)

    for step in range(30):
        tracker.log_metrics({"train/loss": 4.0 - 0.1 * step, "train/lr": 1e-3 * step, "data/failures/decode": 0},
                            step)
        if step % 10 == 9:
            tracker.log_metrics({"val/loss": 4.2 - 0.1 * step, "eval/zeroshot_top1": step / 100}, step)
    tracker.log_metrics({"../outside": 1.0, "train/words": "many", "train/fine": 1.0}, 29)  # two are refused
    extra = tmp_path / "notes.txt"
    extra.write_text("what this run tried")
    tracker.log_artifact(extra, "reports")
    extra.unlink()  # the tracker copied it when asked
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "tiny"}')

    torch.manual_seed(0)
    model = build_model(TINY).eval()
    images, tokens = torch.randn(5, 3, 32, 32), torch.randint(1, 100, (3, 16))
    tracker.log_model(model, (images, tokens), tokenizer_path=tokenizer)
    tracker.log_figures()
    assert tracker.flush(timeout_s=120), "everything should reach a local store"
    tracker.close()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-0"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.info.experiment_id == sweep_experiment == tracker.experiment_id
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert {key: run.data.tags.get(key) for key in config.tags} == {
        "mlflow.source.name": "clip-ray train", "mlflow.source.type": "LOCAL", "mlflow.user": getpass.getuser(),
        "mlflow.source.git.commit": head}  # the tests run in the repository's checkout
    expected_params = flatten_params(run_config)
    assert len(expected_params) > 100  # more than one log_batch of params
    assert run.data.params == expected_params
    assert run.data.params["model.vision.width"] == "32"
    assert run.data.params["data.train.1.format"] == "parquet"
    assert run.data.params["model.vision.resnet_layers"] == "[3, 4, 6, 3]"
    assert len(run.data.params["notes"]) == 6000
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(s, round(4.0 - 0.1 * s, 6)) for s in range(30)]
    assert steps_of(client, tracker.run_id, "eval/zeroshot_top1") == [9, 19, 29]
    assert "train/fine" in run.data.metrics and "../outside" not in run.data.metrics
    assert "train/words" not in run.data.metrics
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)

    def artifacts(path=None) -> set[str]:
        return {a.path for a in client.list_artifacts(tracker.run_id, path)}

    assert {"config.yaml", "reports", "tokenizer", "plots"} <= artifacts()
    assert artifacts("reports") == {"reports/notes.txt"}
    assert artifacts("tokenizer") == {"tokenizer/tokenizer.json"}
    assert {"plots/loss.png", "plots/curves_train.png", "plots/curves_eval.png"} <= artifacts("plots")
    downloaded = Path(client.download_artifacts(tracker.run_id, "plots/loss.png", str(tmp_path)))
    assert Image.open(downloaded).format == "PNG"
    config_file = Path(client.download_artifacts(tracker.run_id, "config.yaml", str(tmp_path)))
    assert "embed_dim: 24" in config_file.read_text()

    logged_model = client.get_logged_model(tracker.model_uri.removeprefix("models:/"))
    assert logged_model.experiment_id == sweep_experiment and logged_model.source_run_id == tracker.run_id
    assert logged_model.params["model.embed_dim"] == "24" and logged_model.status == LoggedModelStatus.READY
    versions = client.search_model_versions("name='tiny-clip'")
    assert [(v.version, v.run_id) for v in versions] == [(tracker.model_version, tracker.run_id)]

    # The logged model, loaded where nothing of this process exists, computes exactly what the original does
    # (at batch sizes other than the example's, so the batch dimension was exported dynamic).
    torch.save({"images": images, "tokens": tokens}, tmp_path / "inputs.pt")
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, tracker.model_uri, str(tmp_path / "inputs.pt"),
                    str(tmp_path / "outputs.pt")], env=env, check=True, timeout=180)
    loaded_outputs = torch.load(tmp_path / "outputs.pt", weights_only=True)
    with torch.no_grad():
        expected = model(images, tokens)
    assert len(loaded_outputs) == 3  # image features, text features, logit scale (no SigLIP bias)
    for got, want in zip(loaded_outputs, expected):
        assert torch.equal(got, want)

    # A resumed job continues the same run: more steps, the same params, no second run.
    resumed = Tracker(config, run_config, resume_run_id=tracker.run_id, flush_interval_s=0.2)
    for step in range(30, 35):
        resumed.log_metrics({"train/loss": 4.0 - 0.1 * step}, step)
    resumed.close()
    assert resumed.run_id == tracker.run_id
    assert steps_of(client, tracker.run_id, "train/loss") == list(range(35))
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert len(client.search_runs([sweep_experiment])) == 2  # the parent and this one child


# --------------------------------------------------------------------------- a server that comes and goes


@pytest.mark.timeout(300)
def test_server_down_at_start_and_in_the_middle_loses_nothing(migrated_db, tmp_path, caplog):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = MlflowServer(port, store_copy(migrated_db, tmp_path / "server"), tmp_path / "server" / "artifacts",
                          tmp_path / "server.log")
    run_config = tiny_run_config()
    config = TrackingConfig(tracking_uri=uri, experiment="outage", log_system_metrics=False, retry_interval_s=1.0)
    caplog.set_level(logging.WARNING, logger="clip_ray.tracking.tracker")

    def outage_warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not reachable" in r.getMessage()]

    def log_steps(steps: range) -> None:
        for step in steps:
            took = timed(tracker.log_metrics, {"train/loss": 1.0 / (step + 1), "train/samples_per_s": 100.0}, step)
            assert took < 1.0, f"log_metrics took {took:.2f} s while the server is away"

    try:
        # Down from the start: every call returns at once, one warning names the server.
        started = time.monotonic()
        tracker = Tracker(config, run_config, flush_interval_s=0.2)
        log_steps(range(0, 10))
        before_server_ms = int(time.time() * 1000)
        note = tmp_path / "down.txt"
        note.write_text("logged while the server was down")
        assert timed(tracker.log_artifact, note) < 1.0
        assert time.monotonic() - started < 3.0
        wait_for(lambda: outage_warnings(), 10, "the outage warning")
        time.sleep(2.5)  # more failed tries, each against a refused port
        assert len(outage_warnings()) == 1 and uri in outage_warnings()[0]
        assert tracker.run_id is None

        # The server comes: the run is created with its params, and the buffer arrives with original steps.
        server.start()
        log_steps(range(10, 15))
        assert tracker.flush(timeout_s=30)
        client = MlflowClient(uri)
        run = client.get_run(tracker.run_id)
        assert run.data.params == flatten_params(run_config)
        history = client.get_metric_history(tracker.run_id, "train/loss")
        assert sorted(m.step for m in history) == list(range(15))
        assert all(m.timestamp <= before_server_ms for m in history if m.step < 10)  # when logged, not sent
        assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"config.yaml", "down.txt"}

        # It crashes mid-run: logging goes on, and once it is back on the same store everything arrives.
        server.kill()
        log_steps(range(15, 25))
        wait_for(lambda: len(outage_warnings()) == 2, 10, "the second outage warning")
        server.start()
        log_steps(range(25, 30))
        assert tracker.flush(timeout_s=30)
        assert steps_of(client, tracker.run_id, "train/loss") == list(range(30))
        assert steps_of(client, tracker.run_id, "train/samples_per_s") == list(range(30))
        tracker.close()
        assert client.get_run(tracker.run_id).info.status == "FINISHED"
    finally:
        server.kill()


def test_close_gives_up_in_bounded_time_when_the_server_never_answers(tmp_path, caplog):
    config = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", log_system_metrics=False,
                            retry_interval_s=0.5)
    tracker = Tracker(config, tiny_run_config(), flush_interval_s=0.1, max_buffered_metrics=10)
    for step in range(25):
        tracker.log_metrics({"train/loss": 1.0}, step)
    assert tracker.dropped_metrics == 15  # the buffer is bounded: the oldest went
    assert not tracker.flush(timeout_s=0.5)
    assert timed(tracker.close, "FAILED", timeout_s=1.0) < 5.0
    assert tracker.run_id is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("not logged: 10 metrics, config.yaml" in m for m in messages), messages


# --------------------------------------------------------------------------- small parts


def test_null_tracker_has_the_tracker_interface():
    public = [name for name in vars(Tracker) if not name.startswith("_")]
    for name in public:
        assert hasattr(NullTracker, name), name
        assert inspect.signature(getattr(NullTracker, name)) == inspect.signature(getattr(Tracker, name)), name
    null = NullTracker()
    null.log_metrics({"loss": 1.0}, 0)
    with null:
        assert null.run_id is None and null.flush()


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="./runs")) == (tmp_path / "runs").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://mlflow.internal:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:////abs/x.db")) == "sqlite:////abs/x.db"


def test_flatten_params_keeps_every_leaf_under_a_dotted_key():
    tree = {"model": {"vision": {"resnet_layers": [3, 4, 6, 3]}, "init_logit_bias": None},
            "data": {"train": [{"path": "a", "weight": 1.0}, {"path": "b", "weight": 2.0}], "val": []},
            "demo": {}}
    assert flatten_params(tree) == {
        "model.vision.resnet_layers": "[3, 4, 6, 3]", "model.init_logit_bias": "None",
        "data.train.0.path": "a", "data.train.0.weight": "1.0", "data.train.1.path": "b",
        "data.train.1.weight": "2.0", "data.val": "[]", "demo": "{}"}


def test_plots_draw_losses_together_and_groups_apart(tmp_path):
    history = {"train/loss": [(s, 5.0 / (s + 1)) for s in range(50)],
               "val/loss": [(s, 6.0 / (s + 1)) for s in range(0, 50, 10)],
               "train/lr": [(s, 1e-3) for s in range(50)],
               "eval/retrieval/i2t_R@1": [(10, 0.1), (20, float("nan")), (30, 0.3)],
               "epoch": [(0, 0.0)]}
    written = plot_history(history, tmp_path)
    assert sorted(p.name for p in written) == ["curves_eval.png", "curves_metrics.png", "curves_train.png",
                                               "curves_val.png", "loss.png"]
    with Image.open(tmp_path / "curves_train.png") as train, Image.open(tmp_path / "loss.png") as loss:
        assert train.width > 2 * train.height  # two panels side by side
        assert loss.format == "PNG"
    assert plot_history({}, tmp_path / "empty") == []


def test_recall_at_k_names_become_valid_mlflow_names():
    from mlflow.utils.validation import _validate_metric_name

    name = mlflow_metric_name("val/image_to_text_R@5")
    assert name == "val/image_to_text_R_at_5"
    _validate_metric_name(name)
    with pytest.raises(Exception):
        _validate_metric_name("val/image_to_text_R@5")


def test_mlflow_run_link_opens_the_machine_learning_view():
    assert (mlflow_run_link("http://mlflow.internal:5000/", "7", "abc123")
            == "http://mlflow.internal:5000/#/experiments/7/runs/abc123?workflowType=machine_learning")
    # A local store is browsed with `mlflow ui`, which listens on 127.0.0.1:5000.
    assert (mlflow_run_link("sqlite:////tmp/x/mlflow.db", "0", "r1")
            == "http://127.0.0.1:5000/#/experiments/0/runs/r1?workflowType=machine_learning")


def test_source_tags_outside_a_git_checkout_have_no_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for its entrypoint
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "my_job.py")])
    assert source_tags() == {"mlflow.source.name": str(tmp_path / "my_job.py"), "mlflow.source.type": "JOB",
                             "mlflow.user": getpass.getuser()}
