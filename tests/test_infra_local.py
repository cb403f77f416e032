"""infra/local: the scripts bring up a real Ray head, a worker node and an MLflow server,
a job submitted with what the scripts print runs and tracks to MLflow, and `stop.sh`
leaves no process behind, not even a job that was still running.

Everything runs on free ports with a temporary state dir, so a cluster the user runs
on this machine is never touched.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
from local_cluster import (
    LOCAL, VENV_BIN, clean_env, free_ports, is_alive, marked_pids, needs_proc, run, short_temp_dir, sourced, tear_down,
)

SCRIPTS = sorted(LOCAL.glob("*.sh"))


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True


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
    temp_dir = short_temp_dir()
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
        # add-worker.sh recorded the worker's Ray node id, the one the head lists.
        node_id = (state_dir / "pids" / "ray-worker-1.node-id").read_text().strip()
        assert re.search(rf"Ray worker 1: running \(pid \d+, node {node_id[:12]}, ", status.stdout), status.stdout
        assert re.search(rf"worker +\S+ +1 CPU +{node_id[:12]}", status.stdout), status.stdout

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
        for node_temp_dir in temp_dirs:  # Ray processes name their temp dir on the command line
            assert subprocess.run(["pgrep", "-f", str(node_temp_dir)], capture_output=True).returncode == 1
        assert all(port_is_free(p) for p in (head, dashboard, client, mlflow_port))
        assert run([LOCAL / "status.sh"], env, timeout=30, check=False).returncode == 3
        assert not (state_dir / "env.sh").exists() and (state_dir / "mlflow" / "mlflow.db").exists()
    finally:
        tear_down(env, state_dir, temp_dir)


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


def test_kill_worker_refuses_what_it_cannot_kill(tmp_path):
    env = clean_env(tmp_path / "state", {})
    usage = run([LOCAL / "kill-worker.sh"], env, timeout=30, check=False)
    assert usage.returncode == 2 and "infra/local/kill-worker.sh N" in usage.stderr
    nothing = run([LOCAL / "kill-worker.sh", "1"], env, timeout=30, check=False)
    assert nothing.returncode == 1 and "no cluster recorded" in nothing.stderr


def test_scripts_pass_shellcheck():
    assert SCRIPTS, "infra/local/*.sh"
    result = subprocess.run([str(VENV_BIN / "shellcheck"), "-x", *map(str, SCRIPTS)], cwd=LOCAL,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in SCRIPTS:
        assert "set -euo pipefail" in script.read_text(), script.name
