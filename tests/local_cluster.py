"""Shared by the tests that start a real local cluster with infra/local/*.sh (test_infra_local,
test_node_loss): free ports, the scripts' environment, and a tear-down that leaves nothing behind.

Everything runs on free ports with a temporary state dir and temp dir, so a cluster the user (or
another test session) runs on this machine is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from repo_paths import REPO_ROOT

LOCAL = REPO_ROOT / "infra" / "local"
VENV_BIN = Path(sys.executable).parent

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


def environ_of(pid: int) -> list[bytes]:
    """The environment a process started with ([] when it is gone or another user's)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def marked_pids(state_dir: Path) -> list[int]:
    """Live processes carrying the scripts' marker for this state dir (read here independently of lib.sh)."""
    marker = f"CLIP_RAY_INSTANCE={state_dir}".encode()
    return [int(path.name) for path in Path("/proc").glob("[0-9]*")
            if marker in environ_of(int(path.name)) and is_alive(int(path.name))]


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


def short_temp_dir() -> Path:
    """A Ray temp dir for the head (workers add -w1, -w2, ...): Ray's socket paths under it must stay
    within 107 bytes, which pytest's tmp_path is too deep for."""
    return Path(tempfile.mkdtemp(prefix="clip-ray-test-", dir="/tmp"))


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


def tear_down(env: dict, state_dir: Path, temp_dir: Path) -> None:
    """stop.sh, then SIGKILL for anything of this test's cluster still alive, and the temp dirs removed."""
    subprocess.run([LOCAL / "stop.sh"], env=env, cwd=REPO_ROOT, capture_output=True, timeout=120)
    for pid in marked_pids(state_dir):  # last resort, only processes this test started
        os.kill(pid, signal.SIGKILL)
    for path in [temp_dir, *temp_dir.parent.glob(f"{temp_dir.name}-w*")]:
        shutil.rmtree(path, ignore_errors=True)
