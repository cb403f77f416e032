"""Losing nodes mid-run, on real Ray nodes that this module starts on 127.0.0.1 with infra/local.

One cluster for everything, laid out as on Kubernetes: a head without CPUs (GCS, jobs API, the job
drivers, Ray Train's controller), two trainer nodes with one training-worker slot and 1 CPU each,
and a CPU-only data node (add-worker.sh --role trainer|data), beside start.sh's MLflow server. A tiny
two-worker job, submitted with `ray job submit`, checkpoints every step to the disk all nodes share.

- The reference run goes uninterrupted. Ray's state API shows one training worker on each trainer
  node and every preprocessing task on the data node (a trainer node's spare half CPU fits no
  1-CPU preprocessing task). It is also read back as a user reads a job: its log, its MLflow run,
  its logged model (loaded with mlflow.pytorch alone), and jobs/eval.py submitted to the same
  cluster; the jobs API answers only with the cluster's token.
- The faulted run is the same job under another run name. It loses, in turn:
  1. the trainer node of rank 0 (kill-worker.sh: SIGKILL to its raylet, agents and workers), after
     a checkpoint: FailureConfig restarts the worker group from the latest checkpoint, on the
     surviving trainer node and a new one that add-worker.sh brings (what KubeRay or the
     autoscaler do when a pod or VM dies);
  2. the data node, mid-epoch, replaced by a new one: the job goes on, Ray Data running its tasks on
     the new node (or, when the job's failure-count actor happened to be on the lost node, after one
     more restart from the latest checkpoint);
  3. its driver (`ray job stop`): submitted again under the same run name, it resumes from the
     latest checkpoint.
  It ends with the reference run's metrics at every step, so no sample was trained twice or lost,
  and its one MLflow run holds exactly one value per step: a step replayed after a restart logs the
  identical value, and no step logged before a checkpoint is missing.

Each kill happens while the training workers are frozen (SIGSTOP) right after a checkpoint is seen,
so it falls mid-run whatever the machine's speed; the kill itself is asynchronous to the loop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from local_cluster import (
    LOCAL, VENV_BIN, clean_env, environ_of, free_ports, marked_pids, needs_proc, run, short_temp_dir, sourced,
    tear_down,
)
from train_job_helpers import TINY_DEMO, tiny_config, write_config

STEPS = 18  # an epoch is 15 steps (480 samples, batches of 32): the run goes into a second epoch
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Metrics that need not repeat; every other one must, exactly. Timings differ by nature. data/ counts what
# preprocessing has done so far, and it runs ahead of training by however far it got. epoch/data/ counts an
# epoch's samples by outcome: after a mid-epoch resume, the unit the resume starts inside reports only the
# rest it reads again (FailureTracker.restore), so its samples before the resume point are not counted.
NOT_COMPARED = ("train/samples_per_s", "eval/seconds", "data/", "epoch/data/")
# Ray Train's controller takes one report per poll (2 s by default); these runs report every step.
JOB_RUNTIME_ENV = json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
# The head declares a SIGKILLed node dead after 3 missed health checks a second apart (15 s by default),
# and only then gives up the placement of its workers and tasks.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


class Cluster:
    """The local cluster: its scripts, the jobs API (through the CLI, as a user) and the state API."""

    def __init__(self, root: Path):
        self.state_dir = root / "state"
        head, dashboard, client, mlflow = free_ports(4)
        self.env = {**clean_env(self.state_dir, dict(HEAD=head, DASHBOARD=dashboard, CLIENT=client, MLFLOW=mlflow)),
                    "CLIP_RAY_HEAD_CPUS": "0", **FAST_NODE_DEATH}
        self.mlflow_url = f"http://127.0.0.1:{mlflow}"
        self.mlflow_db = self.state_dir / "mlflow" / "mlflow.db"  # start.sh's server keeps its runs there
        self.temp_dir = short_temp_dir()
        self.env["CLIP_RAY_TEMP_DIR"] = str(self.temp_dir)
        self.url = f"http://127.0.0.1:{dashboard}"
        self.shell: dict[str, str] = {}

    def start(self) -> None:
        run([LOCAL / "start.sh"], self.env, timeout=300)  # the Ray head and the MLflow server
        for role in ("trainer", "trainer", "data"):  # ray-worker-1, -2 and -3
            self.add_node(role)
        self.shell = sourced(self.state_dir / "env.sh", self.env)

    def add_node(self, role: str) -> None:
        run([LOCAL / "add-worker.sh", "--role", role, "--num-cpus", "1"], self.env, timeout=300)

    def kill_node(self, name: str) -> None:
        run([LOCAL / "kill-worker.sh", name.removeprefix("ray-worker-")], self.env, timeout=60)

    def node_ids(self) -> dict[str, str]:
        """ray-worker-N -> its Ray node id, as add-worker.sh recorded it (lost nodes included)."""
        return {path.name.removesuffix(".node-id"): path.read_text().strip()
                for path in (self.state_dir / "pids").glob("*.node-id")}

    def submit(self, config: Path, demo_dir: Path, script: str = "jobs/train.py", *args) -> str:
        """`ray job submit --no-wait` of a job script on a config: its submission id."""
        args = [VENV_BIN / "ray", "job", "submit", "--no-wait", "--runtime-env-json", JOB_RUNTIME_ENV, "--",
                "python", script, *args, "--config", config, "--demo-data-dir", demo_dir]
        output = run(args, self.shell, timeout=120).stdout
        submitted = re.search(r"Job '(\w+)' submitted successfully", output)
        assert submitted, output[-5000:]
        return submitted.group(1)

    def finished(self, submission_id: str, timeout_s: float = 420) -> str:
        """Waits for the job to end: its final status."""
        deadline = time.monotonic() + timeout_s
        while (status := self.job(submission_id)["status"]) not in TERMINAL:
            assert time.monotonic() < deadline, f"job still {status} after {timeout_s} s:\n" + \
                self.logs(submission_id)[-6000:]
            time.sleep(0.5)
        return status

    def stop_job(self, submission_id: str) -> None:
        run([VENV_BIN / "ray", "job", "stop", submission_id], self.shell, timeout=120)

    def api(self, path: str):
        token = Path(self.shell["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def status_without_token(self) -> int:
        """What the jobs API answers a request that carries no token."""
        try:
            with urllib.request.urlopen(self.url + "/api/jobs/", timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    def job(self, submission_id: str) -> dict:
        return self.api(f"/api/jobs/{submission_id}")

    def logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs")["logs"]

    def state(self, resource: str) -> list[dict]:
        """Everything the state API lists of `nodes`, `actors` or `tasks`, dead ones included."""
        return self.api(f"/api/v0/{resource}?limit=10000&detail=true")["data"]["result"]["result"]

    def train_workers(self) -> dict[int, str]:
        """This cluster's Ray Train worker processes, each with the node (ray-worker-N) it runs on."""
        workers = {}
        for pid in marked_pids(self.state_dir):
            try:
                if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    continue
            except OSError:
                continue
            node = [item for item in environ_of(pid) if item.startswith(b"CLIP_RAY_NODE=")]
            workers[pid] = node[0].split(b"=", 1)[1].decode() if node else "?"
        return workers


def signal_all(pids, sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class FaultedRun:
    """The faulted job's run directory and its current submission, watched while faults are injected."""

    def __init__(self, cluster: Cluster, storage: Path, name: str):
        from clip_ray.driver.trainer import RunDirectory

        self.cluster, self.run_dir = cluster, RunDirectory(str(storage), name)
        self.submission = ""

    def latest_step(self) -> int:
        try:
            latest = self.run_dir.latest_checkpoint()
        except ValueError:  # the snapshot is being rewritten
            return -1
        return int(latest["step"]) if latest else 0

    def wait_for_checkpoint(self, step: int, timeout_s: float = 240) -> int:
        deadline, next_status = time.monotonic() + timeout_s, 0.0
        while (latest := self.latest_step()) < step:
            now = time.monotonic()
            if now > next_status:  # one HTTP call a second, the checkpoint file twenty times a second
                status = self.cluster.job(self.submission)["status"]
                assert status not in TERMINAL, f"the job {status} before a checkpoint at step {step}:\n" + \
                    self.cluster.logs(self.submission)[-6000:]
                next_status = now + 1
            assert now < deadline, f"no checkpoint at step {step} within {timeout_s} s:\n" + \
                self.cluster.logs(self.submission)[-6000:]
            time.sleep(0.05)
        return latest

    def frozen_after_checkpoint(self, step: int) -> tuple[int, dict[int, str]]:
        """Waits for a checkpoint at `step` or later and freezes both training workers at once, wherever
        they are in their loop: (the latest checkpoint once frozen, {worker pid: its node})."""
        self.wait_for_checkpoint(step)
        workers = self.cluster.train_workers()
        signal_all(workers, signal.SIGSTOP)
        assert len(workers) == 2, workers
        assert self.latest_step() < STEPS, "the run ended before it could be interrupted"
        return self.latest_step(), workers

    def rank0_pid(self) -> int:
        """Rank 0 of the worker group the controller started last (it logs each rank's pid)."""
        return int(re.findall(r"pid=(\d+)\) world_rank=0,", self.cluster.logs(self.submission))[-1])


def job_config(root: Path, run_name: str, tracking_uri: str, log_model: bool = False) -> Path:
    config = tiny_config(root / "runs", run_name, STEPS, tracking_uri, demo=dict(TINY_DEMO),
                         cluster={"num_workers": 2, "cpus_per_worker": 0.5, "worker_resources": {"trainer": 1},
                                  "max_failures": 3},
                         data={"preprocess_num_cpus": 1, "progress_log_every_s": 1},
                         tracking={"log_model": log_model})
    return write_config(config, root / f"{run_name}.yaml")


def read_back_reference(cluster: Cluster, root: Path, demo_dir: Path, config: Path, submission: str) -> dict:
    """What a user reads back from the finished reference run while the cluster is up: its logged model
    (loaded with mlflow.pytorch alone, and scored against the checkpoint it came from) and jobs/eval.py
    submitted to the same cluster on its run directory."""
    import mlflow.pytorch
    import torch

    from clip_ray.config import load_config
    from clip_ray.driver.evaluate_model import evaluate_model
    from clip_ray.driver.prepare import prepare_job
    from clip_ray.tracking.export import process_tracking_uri

    logs = cluster.logs(submission)
    run_id = re.search(r"MLflow run ([0-9a-f]{32}) in " + re.escape(cluster.mlflow_url), logs).group(1)
    eval_config = prepare_job(load_config(config), demo_dir).config
    eval_config.data.val = []  # zero-shot only: no Ray Data needed in this process
    with process_tracking_uri(cluster.mlflow_url):
        exported = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    image_features, text_features, scale = exported(torch.zeros(3, 3, 32, 32), torch.ones(3, 24, dtype=torch.long))
    metrics_file = root / "eval.json"
    evaluation = cluster.submit(config, demo_dir, "jobs/eval.py", str(root / "runs" / "reference"),
                                "--json", str(metrics_file))
    status = cluster.finished(evaluation)
    return {"run_id": run_id, "shapes": [tuple(image_features.shape), tuple(text_features.shape), scale.ndim],
            "from_mlflow": evaluate_model(eval_config, f"runs:/{run_id}/model"),
            "from_checkpoint": evaluate_model(eval_config, str(root / "runs" / "reference")),
            "eval_status": status, "eval_logs": cluster.logs(evaluation),
            "evaluated": json.loads(metrics_file.read_text()) if metrics_file.exists() else None}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Starts the cluster, runs the reference and the faulted job, and keeps what the checks read: the
    jobs' logs, Ray's state API and what happened when, before the cluster is stopped."""
    root = tmp_path_factory.mktemp("node-loss")
    cluster = Cluster(root)
    demo_dir = root / "demo-data"
    record: dict = {"mlflow_db": cluster.mlflow_db, "timings": {}, "started": time.monotonic()}
    faulted_run = FaultedRun(cluster, root / "runs", "faulted")
    frozen: dict[int, str] = {}

    def mark(what: str) -> None:
        record["timings"][what] = round(time.monotonic() - record["started"], 1)

    try:
        cluster.start()
        mark("cluster up")
        reference_config = job_config(root, "reference", cluster.mlflow_url, log_model=True)
        record["reference"] = cluster.submit(reference_config, demo_dir)
        assert cluster.finished(record["reference"]) == "SUCCEEDED", cluster.logs(record["reference"])[-6000:]
        mark("reference run")
        record["unauthorised_status"] = cluster.status_without_token()
        record["read_back"] = read_back_reference(cluster, root, demo_dir, reference_config, record["reference"])
        mark("reference run read back")

        # 1. The trainer node of rank 0 dies; a new trainer node joins.
        config = job_config(root, "faulted", cluster.mlflow_url)
        faulted_run.submission = cluster.submit(config, demo_dir)
        record["first"] = faulted_run.submission
        _, frozen = faulted_run.frozen_after_checkpoint(2)
        record["trainer_node_killed"] = frozen[faulted_run.rank0_pid()]
        cluster.kill_node(record["trainer_node_killed"])
        record["trainer_loss_step"] = faulted_run.latest_step()  # what the restart must resume from
        signal_all(frozen, signal.SIGCONT)
        cluster.add_node("trainer")  # ray-worker-4
        mark("trainer node lost and replaced")

        # 2. Once the restarted group has trained two more steps, the data node dies mid-epoch; a new one joins.
        record["data_loss_step"], frozen = faulted_run.frozen_after_checkpoint(record["trainer_loss_step"] + 2)
        mark("restarted after the trainer node")
        time.sleep(2)  # training frozen, preprocessing not: the node holds blocks nobody has fetched yet
        cluster.kill_node("ray-worker-3")
        cluster.add_node("data")  # ray-worker-5
        signal_all(frozen, signal.SIGCONT)
        mark("data node lost and replaced")

        # 3. Two steps later the job is stopped, its driver killed, and submitted again under the same name.
        _, frozen = faulted_run.frozen_after_checkpoint(record["data_loss_step"] + 2)
        mark("trained on after the data node")
        cluster.stop_job(faulted_run.submission)
        signal_all(frozen, signal.SIGCONT)
        record["first_status"] = cluster.finished(faulted_run.submission)
        record["driver_loss_step"] = faulted_run.latest_step()  # what the resubmitted job must resume from
        record["second"] = cluster.submit(config, demo_dir)
        cluster.finished(record["second"])
        mark("resubmitted run")

        record["node_ids"] = cluster.node_ids()
        record["jobs"] = {name: {**cluster.job(record[name]), "logs": cluster.logs(record[name])}
                          for name in ("reference", "first", "second")}
        for name, job in record["jobs"].items():  # beside the runs, for whoever reads a failure
            (root / f"{name}-job.log").write_text(job["logs"])
            (root / f"{name}-job.json").write_text(json.dumps({k: v for k, v in job.items() if k != "logs"}))
        record["nodes"], record["actors"], record["tasks"] = (cluster.state(kind)
                                                              for kind in ("nodes", "actors", "tasks"))
        (root / "state.json").write_text(json.dumps({kind: record[kind] for kind in ("nodes", "actors", "tasks")}))
    finally:
        signal_all(frozen, signal.SIGCONT)
        tear_down(cluster.env, cluster.state_dir, cluster.temp_dir)
        mark("cluster down")
        print("node-loss timings (s since the start):", record["timings"])
    return record


# --------------------------------------------------------------------------- where things ran


def node_roles(record: dict) -> dict[str, str]:
    """node id -> 'head', 'trainer' or 'data' (dead nodes included)."""
    roles = {}
    for node in record["nodes"]:
        total = node.get("resources_total", {})
        roles[node["node_id"]] = "head" if node["is_head_node"] else "trainer" if total.get("trainer") else \
            "data" if total.get("data") else "other"
    return roles


def placement(record: dict, job: str) -> dict[str, list[str]]:
    """Where one job's training workers and preprocessing tasks ran: node ids, one per actor or task attempt."""
    job_id = record["jobs"][job]["job_id"]
    workers = [actor["node_id"] for actor in record["actors"]
               if actor["job_id"] == job_id and actor["class_name"] == "RayTrainWorker"]
    preprocess = [task["node_id"] for task in record["tasks"]
                  if task["job_id"] == job_id and "_preprocess_units" in task["name"] and task.get("node_id")]
    return {"workers": workers, "preprocess": preprocess}


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_runs_on_trainer_nodes_and_preprocessing_on_data_nodes(runs):
    """Issue #12, 5: Ray's state API shows where each job's pieces ran, lost nodes included."""
    roles = node_roles(runs)
    assert sorted(roles.values()) == ["data", "data", "head", "trainer", "trainer", "trainer"], runs["nodes"]
    reference = placement(runs, "reference")
    trainers = {node for node, role in roles.items() if role == "trainer"}
    # The uninterrupted run: a worker on each of the two first trainer nodes, all preprocessing on the data node.
    assert len(reference["workers"]) == 2 and len(set(reference["workers"])) == 2, reference
    assert set(reference["workers"]) < trainers, reference
    data_nodes = {roles[node] for node in reference["preprocess"]}
    assert reference["preprocess"] and data_nodes == {"data"} and len(set(reference["preprocess"])) == 1, reference
    # Every job, through restarts and replaced nodes: workers only on trainer nodes, preprocessing only on data nodes.
    for job in ("first", "second"):
        where = placement(runs, job)
        assert where["workers"] and {roles[node] for node in where["workers"]} == {"trainer"}, (job, where)
        assert where["preprocess"] and {roles[node] for node in where["preprocess"]} == {"data"}, (job, where)
    # The first submission's worker groups: one on the killed node and the survivor, then (once or twice,
    # see the next test) on the survivor and the new trainer node; the second submission's on those two.
    ids = runs["node_ids"]
    killed = ids[runs["trainer_node_killed"]]
    survivor = ids["ray-worker-2" if runs["trainer_node_killed"] == "ray-worker-1" else "ray-worker-1"]
    first, second = placement(runs, "first")["workers"], placement(runs, "second")["workers"]
    assert first.count(killed) == 1 and set(first) == {killed, survivor, ids["ray-worker-4"]}, (ids, first)
    assert sorted(second) == sorted([survivor, ids["ray-worker-4"]]), (ids, second)
    # Preprocessing: on the first data node until it was lost, then on its replacement.
    assert {*placement(runs, "first")["preprocess"], *placement(runs, "second")["preprocess"]} == \
        {ids["ray-worker-3"], ids["ray-worker-5"]}


# --------------------------------------------------------------------------- the reference run, as a user reads it


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_reference_job_reads_back_as_a_user_follows_it(runs):
    """`ray job submit` of jobs/train.py as a user follows it: the job log, the MLflow run, the logged model,
    and jobs/eval.py submitted to the same cluster."""
    assert runs["unauthorised_status"] == 401, "the jobs API answers only with the cluster's token"
    logs = runs["jobs"]["reference"]["logs"]
    assert "starting fresh run reference" in logs and "2 worker(s) x 0.5 CPU" in logs, logs[-5000:]
    # The config was prepared once, on the driver: one tokenizer trained, never looked up again.
    assert logs.count("job reference prepared:") == 1 and logs.count("-token BPE on ") == 1, logs[-5000:]
    assert "reusing tokenizer" not in logs
    assert all(re.search(rf"step {step}/{STEPS} epoch \d \| loss", logs) for step in range(1, STEPS + 1))
    # Ray Data's progress, as text blocks from the stream rank 0 built (its split's coordinator).
    assert "Total Progress:" in logs and "Running Dataset" in logs
    assert "Zero-shot on the 12 held-out colour-shape combinations" in logs
    # The summary table: evaluated at the end only (train.eval_every: 0), so the "before" column is empty.
    assert re.search(r"zero-shot top-1 +- +0\.\d{3} +\(chance 0\.083\)", logs), logs[-3000:]
    assert re.search(r"image->text R@1 +- +\d\.\d{3}", logs)

    # The MLflow run: the whole config as params, every step's loss, the evaluation at the end.
    from mlflow import MlflowClient

    read_back = runs["read_back"]
    run = MlflowClient(f"sqlite:///{runs['mlflow_db']}").get_run(read_back["run_id"])
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["model.embed_dim"] == "32"
    assert run.data.params["cluster.run_name"] == "reference"
    _, history = mlflow_history(runs, "reference")
    assert sorted(history["zeroshot/top1"]) == [STEPS] and sorted(history["train/loss"]) == list(range(1, STEPS + 1))
    logged = {key: history[key][STEPS][0] for key in ("zeroshot/top1", "val/loss")}

    # The logged model loads with mlflow.pytorch alone and scores like the checkpoint it came from.
    assert read_back["shapes"] == [(3, 32), (3, 32), 0]
    for key in ("zeroshot/top1", "zeroshot/top5"):
        assert read_back["from_mlflow"][key] == pytest.approx(read_back["from_checkpoint"][key], abs=1e-6), key
    assert read_back["from_checkpoint"]["zeroshot/top1"] == pytest.approx(logged["zeroshot/top1"])
    # jobs/eval.py on the run directory: its latest checkpoint, every metric, as JSON and as a table.
    assert read_back["eval_status"] == "SUCCEEDED", read_back["eval_logs"][-5000:]
    evaluated = read_back["evaluated"]
    assert evaluated["zeroshot/top1"] == pytest.approx(logged["zeroshot/top1"])
    assert evaluated["val/loss"] == pytest.approx(logged["val/loss"], rel=1e-4)
    assert evaluated["val/num_images"] == TINY_DEMO["num_val"]
    assert re.search(rf"zero-shot top-1 +{evaluated['zeroshot/top1']:.3f} +\(chance 0\.083\)",
                     read_back["eval_logs"])


# --------------------------------------------------------------------------- what the runs logged


def mlflow_history(record: dict, run_name: str) -> tuple[dict, dict[str, dict[int, list[float]]]]:
    """The one MLflow run of that name (its info) and every metric's values per step, in logging order."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{record['mlflow_db']}")  # the server is down by now, its store is not
    experiment = client.get_experiment_by_name("tests")
    found = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{run_name}'")
    assert len(found) == 1, f"{len(found)} MLflow runs named {run_name}: one job, one run"
    history: dict[str, dict[int, list[float]]] = {}
    for key in found[0].data.metrics:
        for metric in sorted(client.get_metric_history(found[0].info.run_id, key), key=lambda m: m.timestamp):
            history.setdefault(key, {}).setdefault(metric.step, []).append(metric.value)
    return found[0].info, history


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_that_loses_a_trainer_node_the_data_node_and_its_driver_ends_as_if_uninterrupted(runs):
    """Issue #12, 3 and 4: restarts and resumes from the latest checkpoint, exactly."""
    first_logs, second_logs = runs["jobs"]["first"]["logs"], runs["jobs"]["second"]["logs"]
    steps = runs["trainer_loss_step"], runs["data_loss_step"], runs["driver_loss_step"]
    assert 0 < steps[0] < steps[1] < steps[2] < STEPS, steps
    # Each restart of the worker group (FailureConfig) logs its decision, and rank 0 where it resumes.
    restarts = first_logs.count("[FailurePolicy] RETRY")
    resumed = [int(step) for step in re.findall(r"clip_ray.train: resuming from \S+ at step (\d+)", first_logs)]
    assert len(resumed) == restarts, (resumed, restarts)
    # 1. The trainer node: a restart from the checkpoint that was the latest when the node was killed.
    assert resumed and resumed[0] == steps[0], (resumed, steps, first_logs[-6000:])
    # 2. The data node: the job goes on; Ray rebuilds blocks that were only on the lost node by running their
    #    tasks again on the new data node (it says "Attempting to recover N lost objects", when any were lost).
    #    Unless the job's failure-count actor (no CPU: Ray may place it on any node) was on the lost node: then
    #    the tasks cannot report to it, and FailureConfig restarts the group once more, from the latest checkpoint.
    assert restarts in (1, 2) and all(step >= steps[1] for step in resumed[1:]), (resumed, steps)
    assert runs["first_status"] == "STOPPED", first_logs[-6000:]
    # 3. The driver: the same run name again resumes from the latest checkpoint, and finishes.
    assert runs["jobs"]["second"]["status"] == "SUCCEEDED", second_logs[-6000:]
    assert f"resuming run faulted from step {steps[2]} of {STEPS}" in second_logs, second_logs[-6000:]
    assert re.search(rf"Run \S+/faulted: {STEPS} steps, {STEPS * 32} samples \(resumed at step {steps[2]}\)",
                     second_logs), second_logs[-3000:]

    reference_info, reference = mlflow_history(runs, "reference")
    faulted_info, faulted = mlflow_history(runs, "faulted")
    assert reference_info.status == faulted_info.status == "FINISHED"
    # Data-failure counts are logged by reason only for reasons that happened: a lost node may add some.
    failure_counts = ("data/", "epoch/data/")
    assert {key for key in faulted if not key.startswith(failure_counts)} == \
        {key for key in reference if not key.startswith(failure_counts)}
    assert "data/failures" in reference and "data/failures" in faulted
    assert sorted(reference["train/loss"]) == list(range(1, STEPS + 1))
    compared = sorted(key for key in reference if not key.startswith(NOT_COMPARED))
    for key in compared:
        expected = {step: values[0] for step, values in reference[key].items()}
        assert all(len(values) == 1 for values in reference[key].values()), (key, reference[key])
        # Every step of the uninterrupted run is there, and nothing else; a step that was done again after
        # a restart (after the last checkpoint before a loss) logged the identical value again.
        assert sorted(faulted[key]) == sorted(expected), (key, sorted(faulted[key]), sorted(expected))
        for step, values in faulted[key].items():
            assert values == pytest.approx([expected[step]] * len(values), rel=0, abs=1e-6), (key, step, values)
    # The final metrics, named for the reader: they were among the compared ones.
    for key in ("train/loss", "val/loss", "val/image_to_text_R_at_1", "zeroshot/top1"):
        assert key in compared and max(faulted[key]) == STEPS, key
    replayed = {step for step, values in faulted["train/loss"].items() if len(values) > 1}
    recovered = re.findall(r"Attempting to recover (\d+) lost objects", first_logs)
    print(f"faulted run: trainer node lost after step {steps[0]}, data node after {steps[1]}, driver after "
          f"{steps[2]}; restarts by FailureConfig: {restarts}, resumed at {resumed}; lost blocks rebuilt by "
          f"Ray: {recovered}; steps logged twice (identically): {sorted(replayed)}")
