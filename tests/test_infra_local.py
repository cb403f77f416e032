"""infra/local: the scripts bring up a real Ray head, a worker node and an MLflow server,
a job submitted with what the scripts print runs and tracks to MLflow, and `stop.sh`
leaves no process behind, not even a job that was still running.

Everything runs on free ports with a temporary state dir, so a cluster the user runs
on this machine is never touched.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT

LOCAL = REPO_ROOT / "infra" / "local"
VENV_BIN = Path(sys.executable).parent
SCRIPTS = sorted(LOCAL.glob("*.sh"))

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(),
                                reason="finding leftover processes by their environment needs /proc (Linux)")


def free_ports(count: int) -> list[int]:
    """Distinct ports that were free a moment ago (held together so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True


def marked_pids(state_dir: Path) -> list[int]:
    """Live processes carrying the scripts' marker for this state dir (read here independently of lib.sh)."""
    marker = f"CLIP_RAY_INSTANCE={state_dir}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and is_alive(int(environ.parent.name)):
                pids.append(int(environ.parent.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return pids


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def clean_env(state_dir: Path, ports: dict[str, int]) -> dict[str, str]:
    """This process's environment without any Ray/MLflow address or token, plus the scripts' settings."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "CLIP_RAY_"))}
    env.update({f"CLIP_RAY_{name}_PORT": str(port) for name, port in ports.items()})
    env.update(CLIP_RAY_STATE_DIR=str(state_dir), CLIP_RAY_HEAD_CPUS="1", CLIP_RAY_WORKER_CPUS="1",
               CLIP_RAY_OBJECT_STORE_MB="128", VIRTUAL_ENV=str(VENV_BIN.parent))
    return env


def run(args: list, env: dict, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def sourced(env_file: Path, env: dict) -> dict[str, str]:
    """The environment after `source env.sh`, as a user's shell would have it."""
    out = run(["bash", "-c", f'source "{env_file}" && env -0'], env, timeout=10).stdout
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


def tear_down(env: dict, state_dir: Path, temp_dirs: list[Path]) -> None:
    """stop.sh, then SIGKILL for anything of this test's cluster still alive, and the temp dirs removed."""
    subprocess.run([LOCAL / "stop.sh"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=120)
    for pid in marked_pids(state_dir):  # last resort, only processes this test started
        os.kill(pid, signal.SIGKILL)
    for temp_dir in temp_dirs:
        shutil.rmtree(temp_dir, ignore_errors=True)


# Runs on the cluster: joins it, reports its CPUs, logs a metric and an artifact to the MLflow
# server it finds in its environment (set by start.sh), and says which python ran it.
JOB = textwrap.dedent("""
    import os, sys, mlflow, ray
    ray.init()
    cpus = ray.cluster_resources()["CPU"]
    mlflow.set_experiment("infra-local-test")
    with mlflow.start_run() as run:
        mlflow.log_metric("cluster_cpus", cpus)
        mlflow.log_text("served through the tracking server", "notes/hello.txt")
    print("CPUS", cpus, "RUN", run.info.run_id, "URI", os.environ["MLFLOW_TRACKING_URI"], "PY", sys.executable)
""")


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_local_cluster_runs_a_job_tracks_it_and_stops_clean(tmp_path):
    state_dir = tmp_path / "state"
    head, dashboard, client, mlflow_port = free_ports(4)
    env = clean_env(state_dir, dict(HEAD=head, DASHBOARD=dashboard, CLIENT=client, MLFLOW=mlflow_port))
    # Short: Ray's socket paths under it must stay within 107 bytes (pytest's tmp_path is too deep).
    temp_dir = Path(tempfile.mkdtemp(prefix="clip-ray-test-", dir="/tmp"))
    env["CLIP_RAY_TEMP_DIR"] = str(temp_dir)
    temp_dirs = [temp_dir, Path(f"{temp_dir}-w1")]
    try:
        started = run([LOCAL / "start.sh", "--workers", "1"], env, timeout=300)
        assert all(d.is_dir() for d in temp_dirs), "the head and the worker use their own temp dirs"

        status = run([LOCAL / "status.sh"], env, timeout=60)
        assert "Ray head: running" in started.stdout and "Ray head: running" in status.stdout
        assert f"dashboard: http://127.0.0.1:{dashboard}" in status.stdout
        assert "nodes:     2 alive" in status.stdout
        assert re.search(r"head +\S+ +1 CPU", status.stdout) and re.search(r"worker +\S+ +1 CPU", status.stdout)
        assert "MLflow: running (pid " in status.stdout and f"at http://127.0.0.1:{mlflow_port}, health: OK" in status.stdout
        assert "auth:      token" in status.stdout

        with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=5) as response:
            assert response.read().decode() == "OK"

        shell = sourced(state_dir / "env.sh", env)
        assert shell["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{dashboard}"
        assert shell["RAY_ADDRESS"].endswith(f":{head}")
        assert shell["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in shell
        assert shell["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"

        # Token auth is really on: without the token the jobs API refuses (HOME hides any ~/.ray/auth_token).
        anonymous = {**env, "HOME": str(tmp_path), "RAY_API_SERVER_ADDRESS": shell["RAY_API_SERVER_ADDRESS"]}
        refused = run([VENV_BIN / "ray", "job", "list"], anonymous, timeout=60, check=False)
        assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr

        # `python` on the cluster is the venv's: start.sh put it first on the nodes' PATH.
        submitted = run([VENV_BIN / "ray", "job", "submit", "--", "python", "-c", JOB], shell, timeout=180)
        assert "succeeded" in submitted.stdout + submitted.stderr
        printed = re.search(r"CPUS (\S+) RUN (\w+) URI (\S+) PY (\S+)", submitted.stdout)
        assert printed, submitted.stdout
        cpus, run_id, uri, python = printed.groups()
        assert float(cpus) == 2.0, "the head's CPU and the worker's CPU"
        assert uri == f"http://127.0.0.1:{mlflow_port}"
        assert Path(python).parent.resolve() == VENV_BIN.resolve()

        with urllib.request.urlopen(f"{uri}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=10) as response:
            logged = json.load(response)["run"]
        assert [m["value"] for m in logged["data"]["metrics"] if m["key"] == "cluster_cpus"] == [2.0]
        artifacts = list((state_dir / "mlflow" / "artifacts").rglob("notes/hello.txt"))
        assert len(artifacts) == 1 and artifacts[0].read_text() == "served through the tracking server"

        # A job still running at stop time must die with the cluster.
        job_pid_file = tmp_path / "job.pid"
        sleeper = f"import os, time; open({str(job_pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
        run([VENV_BIN / "ray", "job", "submit", "--no-wait", "--", "python", "-c", sleeper], shell, timeout=60)
        deadline = time.monotonic() + 90
        while not (job_pid_file.exists() and job_pid_file.read_text()):
            assert time.monotonic() < deadline, "the sleeping job never started"
            time.sleep(0.5)
        job_pid = int(job_pid_file.read_text())
        assert is_alive(job_pid) and job_pid in marked_pids(state_dir)

        run([LOCAL / "stop.sh"], env, timeout=120)
        assert marked_pids(state_dir) == []
        assert not is_alive(job_pid)
        for temp_dir in temp_dirs:  # Ray processes name their temp dir on the command line
            assert subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True).returncode == 1
        assert all(port_is_free(p) for p in (head, dashboard, client, mlflow_port))
        assert run([LOCAL / "status.sh"], env, timeout=30, check=False).returncode == 3
        assert not (state_dir / "env.sh").exists() and (state_dir / "mlflow" / "mlflow.db").exists()
    finally:
        tear_down(env, state_dir, temp_dirs)


def test_start_refuses_a_taken_port_and_starts_nothing(tmp_path):
    state_dir = tmp_path / "state"
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        env = clean_env(state_dir, dict(MLFLOW=taken_port))
        result = run([LOCAL / "start.sh", "--no-ray"], env, timeout=60, check=False)
    assert result.returncode != 0
    assert f"port {taken_port} is taken" in result.stderr
    assert not list(state_dir.glob("pids/*.pid")) and not (state_dir / "env.sh").exists()
    assert run([LOCAL / "status.sh"], env, timeout=30, check=False).returncode == 3


def test_scripts_pass_shellcheck():
    assert SCRIPTS, "infra/local/*.sh"
    result = subprocess.run([str(VENV_BIN / "shellcheck"), "-x", *map(str, SCRIPTS)], cwd=LOCAL,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS:
        assert "set -euo pipefail" in script.read_text(), script.name


# Where the job's pieces ran, from Ray's state API: node id -> custom resources, the training workers'
# nodes, and the nodes of Ray Data's preprocessing tasks.
PLACEMENT = textwrap.dedent("""
    import json, ray
    from ray.util.state import list_actors, list_nodes, list_tasks
    ray.init()
    nodes = {n.node_id: {k: v for k, v in n.resources_total.items() if k in ("trainer", "data", "CPU")}
             for n in list_nodes(filters=[("state", "=", "ALIVE")])}
    workers = [a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)]
    tasks = [t.node_id for t in list_tasks(limit=10000, raise_on_missing_output=False)
             if "_preprocess_units" in t.name and t.node_id]
    print("PLACEMENT", json.dumps({"nodes": nodes, "workers": workers, "preprocess": tasks}))
""")


@needs_proc
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_node_roles_put_training_on_trainer_nodes_and_preprocessing_on_the_data_node(tmp_path):
    """A head without CPUs, two trainer nodes (one worker slot each) and a CPU-only data node, as on
    Kubernetes: a two-worker training job puts one worker on each trainer node, and every Ray Data
    preprocessing task on the data node (the trainer nodes' spare half CPU fits no 1-CPU task)."""
    from train_job_helpers import TINY_DEMO, tiny_config, write_config

    state_dir = tmp_path / "state"
    head, dashboard, client, mlflow_port = free_ports(4)
    env = clean_env(state_dir, dict(HEAD=head, DASHBOARD=dashboard, CLIENT=client, MLFLOW=mlflow_port))
    env["CLIP_RAY_HEAD_CPUS"] = "0"
    temp_dir = Path(tempfile.mkdtemp(prefix="clip-ray-test-", dir="/tmp"))
    env["CLIP_RAY_TEMP_DIR"] = str(temp_dir)
    temp_dirs = [temp_dir] + [Path(f"{temp_dir}-w{n}") for n in (1, 2, 3)]
    try:
        run([LOCAL / "start.sh", "--no-mlflow"], env, timeout=300)
        for role in ("trainer", "trainer", "data"):
            run([LOCAL / "add-worker.sh", "--role", role, "--num-cpus", "1"], env, timeout=300)
        status = run([LOCAL / "status.sh"], env, timeout=60).stdout
        assert "nodes:     4 alive" in status and len(re.findall(r"1 CPU, trainer 1", status)) == 2, status
        assert len(re.findall(r"1 CPU, data 1", status)) == 1, status

        config = tiny_config(tmp_path / "runs", "roles", 3, f"sqlite:///{tmp_path}/mlflow.db", demo=dict(TINY_DEMO),
                             cluster={"num_workers": 2, "cpus_per_worker": 0.5, "worker_resources": {"trainer": 1}},
                             data={"preprocess_num_cpus": 1})
        config_file = write_config(config, tmp_path / "job.yaml")
        shell = sourced(state_dir / "env.sh", env)
        trained = run([VENV_BIN / "ray", "job", "submit", "--", "python", "jobs/train.py", "--config", config_file,
                       "--demo-data-dir", tmp_path / "demo-data"], shell, timeout=420, check=False)
        assert "succeeded" in trained.stdout + trained.stderr, (trained.stdout + trained.stderr)[-5000:]

        listed = run([VENV_BIN / "ray", "job", "submit", "--", "python", "-c", PLACEMENT], shell, timeout=180)
        placement = json.loads(re.search(r"PLACEMENT (.*)", listed.stdout).group(1))
        trainers = {node for node, res in placement["nodes"].items() if res.get("trainer")}
        (data_node,) = [node for node, res in placement["nodes"].items() if res.get("data")]
        assert len(trainers) == 2 and sorted(placement["workers"]) == sorted(trainers), placement
        assert placement["preprocess"] and set(placement["preprocess"]) == {data_node}, placement
    finally:
        tear_down(env, state_dir, temp_dirs)
