"""jobs/train.py as a user runs it: submitted with `ray job submit` to a Ray head that this
test starts (dashboard on, token auth on), read back from MLflow; and refused, in one
line naming the key, before any worker starts when the config is wrong."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import ray
import torch
from mlflow import MlflowClient
from repo_paths import REPO_ROOT
from train_job_helpers import TINY_DEMO, free_port, tiny_config, write_config

from clip_ray.cli import main
from clip_ray.config import Config, from_dict, load_config
from clip_ray.driver.demo import demo_report, prepare_demo
from clip_ray.driver.evaluate_model import evaluate_model
from clip_ray.driver.prepare import prepare_job
from clip_ray.eval.report import metrics_table
from clip_ray.model.tokenizer import train_bpe_tokenizer
from clip_ray.tracking.export import process_tracking_uri as _process_tracking_uri

# --------------------------------------------------------------------------- config errors


@pytest.fixture
def small_tokenizer(tmp_path) -> Path:
    path = tmp_path / "tokenizer.json"
    train_bpe_tokenizer(["a red circle", "two blue squares", "a green star"] * 20, vocab_size=300).save(path)
    return path


def _valid_job(tmp_path, small_tokenizer) -> dict:
    config = tiny_config(tmp_path / "runs", "bad", 2, f"sqlite:///{tmp_path}/mlflow.db")
    shards = tmp_path / "shards"
    shards.mkdir(exist_ok=True)
    (shards / "00000.tar").touch()  # never read: every case fails before
    config["data"].update({"train": [{"path": str(shards)}], "tokenizer": str(small_tokenizer)})
    return config


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1e-3", "train.learning_rate: unknown key"),
    ("train.lr=-1", "train.lr=-1.0: must be positive"),
    ("model.text.vocab_size=260", "model.text.vocab_size=260: the tokenizer"),
    ("data.tokenizer=/nowhere/tokenizer.json", "data.tokenizer='/nowhere/tokenizer.json': no such local file"),
    ("data.zeroshot_dir=/nowhere/classes", "data.zeroshot_dir='/nowhere/classes': no such folder"),
    ("train.accumulation_steps=3", "train.global_batch_size=32: must be divisible"),
    ("data.train=[{path: /nowhere/shards}]", "data.train[0].path='/nowhere/shards': no such file or folder"),
])
def test_config_errors_are_one_line_naming_the_key_before_ray_starts(override, message, tmp_path,
                                                                     small_tokenizer, capsys):
    config_file = write_config(_valid_job(tmp_path, small_tokenizer), tmp_path / "job.yaml")
    assert not ray.is_initialized()
    assert main(["train", "--config", str(config_file), "--set", override]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"clip-ray train: {message}") and "\n" not in error, error
    assert not ray.is_initialized(), "no cluster was started for a config that cannot run"


def test_the_job_script_exits_non_zero_with_the_message(tmp_path, small_tokenizer):
    config = _valid_job(tmp_path, small_tokenizer)
    config["cluster"]["num_workers"] = 0
    config_file = write_config(config, tmp_path / "job.yaml")
    done = subprocess.run([sys.executable, "jobs/train.py", "--config", str(config_file)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "clip-ray train: cluster.num_workers=0: must be positive"
    assert "Started a local Ray instance" not in done.stdout + done.stderr


def test_metrics_table_puts_chance_beside_zero_shot():
    before = {"zeroshot/top1": 0.08, "zeroshot/top5": 0.41, "zeroshot/chance_top1": 1 / 12,
              "val/image_to_text_R@1": 0.01}
    after = {"zeroshot/top1": 0.5, "zeroshot/top5": 0.99, "zeroshot/chance_top1": 1 / 12}
    lines = metrics_table({"before": before, "after": after}).splitlines()
    assert lines[0].split() == ["before", "after"]
    assert lines[1].split() == ["zero-shot", "top-1", "0.080", "0.500", "(chance", "0.083)"]
    assert lines[2].split() == ["zero-shot", "top-5", "0.410", "0.990", "(chance", "0.417)"]
    assert lines[3].split() == ["image->text", "R@1", "0.010", "-"], "a value measured in one column only"
    assert len(lines) == 4


def test_demo_pieces_fill_the_config_and_report(tmp_path):
    raw = tiny_config(tmp_path / "runs", "demo", 2, f"sqlite:///{tmp_path}/mlflow.db", demo=dict(TINY_DEMO))
    raw["data"]["tokenizer"] = ""  # the demo supplies one
    config, dataset = prepare_demo(from_dict(Config, raw), tmp_path / "demo-data")
    assert [s.path for s in config.data.train] == [str(tmp_path / "demo-data" / "train")]
    assert [s.path for s in config.data.val] == [str(tmp_path / "demo-data" / "val")]
    assert config.data.zeroshot_dir == dataset.zeroshot_dir and config.data.tokenizer == "bpe:384"
    assert len(dataset.class_names) == 12 and dataset.chance_level == pytest.approx(1 / 12)

    # A second preparation reuses the data; a value the config sets is kept.
    raw["data"]["zeroshot_dir"] = dataset.zeroshot_seen_dir
    again, same = prepare_demo(from_dict(Config, raw), tmp_path / "demo-data")
    assert same.manifest_path == dataset.manifest_path and again.data.zeroshot_dir == dataset.zeroshot_seen_dir

    report = demo_report({"zeroshot/top1": 0.1, "zeroshot/chance_top1": 1 / 12},
                         {"zeroshot/top1": 0.6, "zeroshot/chance_top1": 1 / 12}, dataset).splitlines()
    assert report[0].startswith("Zero-shot on the 12 held-out colour-shape combinations")
    assert "chance 0.083" in report[0] and "retrieval on 64 validation pairs" in report[0]
    assert report[2].split() == ["zero-shot", "top-1", "0.100", "0.600", "(chance", "0.083)"]


# --------------------------------------------------------------------------- a real cluster


def _get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):  # not listening yet
        return 0


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _submit(ray_head: dict, entrypoint: list[str], name: str = "train",
            attempts: int = 3) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit`, waiting for the job to end; tried again when the dashboard dropped the request
    (its job module can lag behind the HTTP server on a busy machine). Returns the job id and the result."""
    for attempt in range(attempts):
        job_id = f"clip-ray-e2e-{name}-{attempt}"
        done = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["address"],
             "--submission-id", job_id, "--working-dir", str(REPO_ROOT), "--", *entrypoint],
            env=ray_head["env"], capture_output=True, text=True, timeout=540)
        if done.returncode == 0 or "requests.exceptions.ConnectionError" not in done.stderr:
            return job_id, done
        time.sleep(3)
    return job_id, done


def _stop(head: subprocess.Popen) -> list[psutil.Process]:
    """Stops this one cluster as `ray stop` would, which itself would stop every Ray cluster on the
    machine: SIGTERM (to the blocking `ray start`, which takes its processes down), then SIGKILL
    for what is still there after a grace period. Returns the processes that outlived even that."""
    try:
        processes = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    head.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=5)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    head.wait(timeout=10)
    return alive


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with its dashboard (the jobs API) and token auth on."""
    temp_dir = Path(tempfile.mkdtemp(prefix="crh-", dir="/tmp"))  # Ray's socket paths must stay short
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port()}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
               f"--temp-dir={temp_dir}", *(f"{flag}={port}" for flag, port in ports.items())]
    log = open(temp_dir / "head.log", "w")
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 120
        while not (_get(f"{address}/api/jobs/", token) == 200 and _listening(ports["--dashboard-agent-listen-port"])):
            assert head.poll() is None, (temp_dir / "head.log").read_text()
            assert time.monotonic() < deadline, "the Ray head did not come up in 120 s"
            time.sleep(1)
        yield {"address": address, "env": env, "token": token}
    finally:
        survivors = _stop(head)
        log.close()
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors and not leftovers, f"Ray processes left running: {survivors + leftovers}"


@pytest.mark.timeout(600)
def test_ray_job_submit_trains_the_demo_and_mlflow_has_the_run(ray_head, tmp_path):
    # The jobs API answers only with the cluster's token.
    assert _get(f"{ray_head['address']}/api/jobs/", None) == 401
    assert _get(f"{ray_head['address']}/api/jobs/", ray_head["token"]) == 200

    steps, mlflow_uri = 4, f"sqlite:///{tmp_path}/mlflow.db"
    # Two DDP workers with half a CPU each on a two-CPU cluster: Ray Data still gets a CPU to decode with.
    config = tiny_config(tmp_path / "runs", "e2e", steps, mlflow_uri, demo=dict(TINY_DEMO),
                         train={"eval_every": steps, "checkpoint_every": 2, "keep_checkpoints": 2},
                         cluster={"num_workers": 2, "cpus_per_worker": 0.5}, data={"progress_log_every_s": 1})
    config_file = write_config(config, tmp_path / "job.yaml")
    data_dir = tmp_path / "demo-data"
    # The entrypoint runs with the PATH of `ray start`, so it names this environment's python.
    entrypoint = [sys.executable, "jobs/train.py", "--config", str(config_file), "--demo-data-dir", str(data_dir)]
    job_id, done = _submit(ray_head, entrypoint)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and f"Job '{job_id}' succeeded" in output, output[-5000:]

    # What a person follows in the job's log.
    assert "starting fresh run e2e" in output and "2 worker(s) x 0.5 CPU" in output
    # The config was prepared once, on the driver: one tokenizer trained, never looked up again.
    assert output.count("job e2e prepared:") == 1 and output.count("-token BPE on ") == 1, output[-5000:]
    assert "reusing tokenizer" not in output
    assert all(f"step {step}/{steps} epoch 0 | loss" in output for step in range(1, steps + 1))
    # Ray Data's progress, as text blocks from the stream rank 0 built (its split's coordinator).
    assert "Total Progress:" in output and "Running Dataset" in output
    assert "Zero-shot on the 12 held-out colour-shape combinations" in output
    assert re.search(r"zero-shot top-1 +0\.\d{3} +0\.\d{3} +\(chance 0\.083\)", output)
    assert re.search(r"image->text R@1 +\d\.\d{3} +\d\.\d{3}", output)
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) in " + re.escape(mlflow_uri), output).group(1)
    assert f"mlflow ui --backend-store-uri {mlflow_uri}" in output

    # The MLflow run: the whole config as params, every step's loss, evaluation before and after.
    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(steps) and run.data.params["model.embed_dim"] == "32"
    assert run.data.params["cluster.run_name"] == "e2e"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, steps + 1))
    assert sorted(m.step for m in client.get_metric_history(run_id, "zeroshot/top1")) == [0, steps]

    # The logged model loads with mlflow.pytorch alone and scores like the checkpoint it came from.
    eval_config = prepare_job(load_config(config_file), data_dir).config
    eval_config.data.val = []  # zero-shot only: no Ray Data needed in this process
    with _process_tracking_uri(mlflow_uri):
        import mlflow.pytorch

        exported = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    image_features, text_features, scale = exported(torch.zeros(3, 3, 32, 32), torch.ones(3, 24, dtype=torch.long))
    assert image_features.shape == text_features.shape == (3, 32) and scale.ndim == 0
    from_mlflow = evaluate_model(eval_config, f"runs:/{run_id}/model")
    from_checkpoint = evaluate_model(eval_config, str(tmp_path / "runs" / "e2e"))
    for key in ("zeroshot/top1", "zeroshot/top5"):
        assert from_mlflow[key] == pytest.approx(from_checkpoint[key], abs=1e-6), key
    assert from_checkpoint["zeroshot/top1"] == pytest.approx(_logged(client, run_id, "zeroshot/top1", steps))

    # jobs/eval.py submitted to the same cluster, on the run directory: its latest checkpoint, all metrics, JSON.
    metrics_file = tmp_path / "eval.json"
    job_id, done = _submit(ray_head, [sys.executable, "jobs/eval.py", str(tmp_path / "runs" / "e2e"), "--config",
                                      str(config_file), "--demo-data-dir", str(data_dir), "--json", str(metrics_file)],
                           name="eval")
    output = done.stdout + done.stderr
    assert done.returncode == 0 and f"Job '{job_id}' succeeded" in output, output[-5000:]
    evaluated = json.loads(metrics_file.read_text())
    assert evaluated["zeroshot/top1"] == pytest.approx(_logged(client, run_id, "zeroshot/top1", steps))
    assert evaluated["val/loss"] == pytest.approx(_logged(client, run_id, "val/loss", steps), rel=1e-4)
    assert evaluated["val/num_images"] == TINY_DEMO["num_val"]
    assert re.search(rf"zero-shot top-1 +{evaluated['zeroshot/top1']:.3f} +\(chance 0\.083\)", output)


def _logged(client: MlflowClient, run_id: str, key: str, step: int) -> float:
    return next(m.value for m in client.get_metric_history(run_id, key) if m.step == step)
