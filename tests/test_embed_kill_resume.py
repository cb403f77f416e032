"""A killed `clip-ray embed` job, run again, finishes the rest and writes each key exactly once.

`python jobs/embed.py` embeds 60 real Flickr8k photos' 300 captions, cut into 15 partitions
of 20 rows, as its own process with its own local Ray (a Ray temp dir of the test's, so its
processes can be found). As soon as the first part file appears, the driver and every process
it started are SIGKILLed. The same command then runs to the end: the files finished before the
kill are reused untouched (same inode and mtime, counted as reused), no temporary file is left,
every input key is in exactly one row, and the rows equal those of an uninterrupted run (the same
command, run in this process). Last: the pipeline hands partitions back one by one with the default actor
resources too (an expected failure until clip_ray/inference/pipeline.py stops Ray Data fusing
decoding into the encoder actors).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flickr_embed_helpers import caption_folder, train_small_clip
from repo_paths import REPO_ROOT

from clip_ray.cli import main
from clip_ray.config import EmbedConfig, SourceConfig
from clip_ray.data.formats import FailureCounts
from clip_ray.data.formats.samples import make_key
from clip_ray.inference.embedding_files import PAIR_COLUMNS, STATS_FILE
from clip_ray.inference.models import resolve_model
from clip_ray.inference.partitions import plan_embed_partitions
from clip_ray.inference.pipeline import encode_partitions

PHOTOS = 60
ROWS_PER_PARTITION = 20  # four photos of five captions
PARTITIONS = PHOTOS * 5 // ROWS_PER_PARTITION
RAY_INIT_KWARGS = {"num_cpus": 2}  # the in-process cluster of the last two tests, started after the jobs' have gone


def embed_command(folder: Path, out: Path, run_dir: Path) -> list[str]:
    # The default actor and decode resources: the pipeline keeps the stages apart, so partitions reach the driver
    # (and their files are written) one by one (test_partitions_reach_the_driver_one_by_one).
    return [sys.executable, str(REPO_ROOT / "jobs" / "embed.py"), str(folder), str(out), "--input-format", "csv",
            "--model", str(run_dir), "--dtype", "float32", "--samples-per-partition", str(ROWS_PER_PARTITION),
            "--batch-size", str(ROWS_PER_PARTITION), "--num-cpus", "2"]


def job_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env.update({"RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    return env


def ray_processes(ray_tmp: str) -> list[psutil.Process]:
    """Live processes of the Ray that runs under `ray_tmp` (its path is in their command lines)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] != psutil.STATUS_ZOMBIE and ray_tmp in " ".join(process.info["cmdline"] or ()):
            found.append(process)
    return found


def kill_job(process: subprocess.Popen, ray_tmp: str) -> list[psutil.Process]:
    """SIGKILL the driver and everything it started: its process group at once (it was started in a
    session of its own), then any descendant or process of its Ray that left the group. Returns them all, reaped."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    known = {victim.pid for victim in tree}
    tree += [other for other in ray_processes(ray_tmp) if other.pid not in known]
    for victim in tree:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    return tree


def run_to_end(command: list[str], env: dict, log: Path) -> None:
    with log.open("a") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600)
    assert done.returncode == 0, log.read_text()[-4000:]


def part_files(out: Path) -> dict[str, os.stat_result]:
    return {path.name: path.stat() for path in sorted(out.glob("part-*.parquet"))}


def read_rows(out: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in sorted(out.glob("part-*.parquet"))])


@pytest.fixture(scope="module")
def killed_and_resumed(flickr8k_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-resume")
    # Untrained and wider than the recall test's: a partition takes a noticeable time to encode, so the
    # partitions finish one by one and a kill at the first file leaves most of them to do.
    small = train_small_clip(flickr8k_dir, root / "model", photos=64, steps=0, width=256, layers=4)
    folder, rows = caption_folder(flickr8k_dir, root / "flickr8k-test-60", "test", PHOTOS)
    out, log = root / "embeddings", root / "jobs.log"
    ray_tmp = tempfile.mkdtemp(prefix="cr-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    env = job_env(ray_tmp)
    command = embed_command(folder, out, small.run_dir)
    with log.open("w") as job_log:
        first = subprocess.Popen(command, stdout=job_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 300
    while not part_files(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ended_by_itself = first.poll() is not None  # the test says so; the fixture goes on
    killed = [] if ended_by_itself else kill_job(first, ray_tmp)
    survivors = [victim.pid for victim in killed if victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE]
    survivors += [other.pid for other in ray_processes(ray_tmp)]
    before = part_files(out)
    leftovers = sorted(path.name for path in out.glob("*.tmp"))
    run_to_end(command, env, log)
    yield {"rows": rows, "folder": folder, "run_dir": small.run_dir, "out": out, "ended_by_itself": ended_by_itself, "killed": len(killed),
           "survivors": survivors, "before": before, "leftovers": leftovers,
           "stats": json.loads((out / STATS_FILE).read_text())}
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_killed_job_resumed_writes_each_key_once_and_keeps_finished_files(killed_and_resumed):
    run = killed_and_resumed
    out, before, stats = run["out"], run["before"], run["stats"]
    assert not run["ended_by_itself"], "the job ended before it could be killed"
    assert run["survivors"] == [], "processes of the killed job's Ray outlived it"
    assert 1 <= len(before) < PARTITIONS, f"the kill landed after {len(before)} of {PARTITIONS} partitions"
    print(f"killed {run['killed']} processes after {len(before)} of {PARTITIONS} partitions; temporary files then: "
          f"{run['leftovers']}")

    after = part_files(out)
    assert len(after) == PARTITIONS and not list(out.glob("*.tmp"))
    for name, stat in before.items():  # the same file, never rewritten
        assert (after[name].st_ino, after[name].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), name
    assert stats["partitions_reused"] == len(before)
    assert stats["partitions_written"] == PARTITIONS - len(before)
    assert stats["rows_written"] == 5 * PHOTOS and stats["failures"] == {}

    keys = read_rows(out)["key"].to_pylist()
    captions_seen: Counter = Counter()
    expected = []
    for image, _ in run["rows"]:  # a caption table's key: the image's name and the caption's number
        expected.append(make_key(image, captions_seen[image]))
        captions_seen[image] += 1
    assert len(keys) == len(set(keys)) == len(expected)
    assert sorted(keys) == sorted(expected)


@pytest.fixture(scope="module")
def uninterrupted(killed_and_resumed, tmp_path_factory, ray_cluster):
    """The same job through the same command line, in this process on the module's cluster (started only now)."""
    clean = tmp_path_factory.mktemp("uninterrupted") / "embeddings"
    command = embed_command(killed_and_resumed["folder"], clean, killed_and_resumed["run_dir"])
    assert main(["embed", *command[2:]]) == 0  # --num-cpus is for a cluster it would start: it starts none
    return clean


@pytest.mark.slow
def test_the_resumed_output_equals_an_uninterrupted_run(killed_and_resumed, uninterrupted):
    out, clean = killed_and_resumed["out"], uninterrupted
    assert sorted(part_files(out)) == sorted(part_files(clean))
    resumed, uninterrupted = read_rows(out), read_rows(clean)
    for column in ("key", "caption", "source"):
        assert resumed[column].to_pylist() == uninterrupted[column].to_pylist()
    for column in ("image_embedding", "text_embedding"):
        np.testing.assert_allclose(np.stack(resumed[column].to_numpy(zero_copy_only=False)),
                                   np.stack(uninterrupted[column].to_numpy(zero_copy_only=False)), rtol=0, atol=1e-6)


@pytest.mark.slow  # its fixture is the slow one
def test_partitions_reach_the_driver_one_by_one(killed_and_resumed, ray_cluster):
    """With the default actor resources each partition comes back as soon as it is embedded, not all at the end."""
    config = EmbedConfig(output=str(killed_and_resumed["out"]), model=str(killed_and_resumed["run_dir"]),
                         source=SourceConfig(path=str(killed_and_resumed["folder"]), format="csv"),
                         samples_per_partition=ROWS_PER_PARTITION, batch_size=ROWS_PER_PARTITION, dtype="float32")
    partitions = plan_embed_partitions(config, FailureCounts())
    batches = 0

    def count_batch(_pending_rows: int) -> None:
        nonlocal batches
        batches += 1

    arrivals = [batches for _ in encode_partitions(partitions, resolve_model(config.model), config,
                                                   source=config.source, towers=("image", "text"),
                                                   columns=PAIR_COLUMNS, tick=count_batch)]
    assert len(arrivals) == PARTITIONS
    assert len(set(arrivals)) > 1, f"all {PARTITIONS} partitions came back in one batch of the pipeline's output"
