"""jobs/train.py refused, in one line naming the key, before any worker starts when the config is
wrong; the demo's pieces and the summary table.

(Submitted with `ray job submit` to a cluster with token auth and read back from its log, MLflow and
jobs/eval.py: tests/test_node_loss.py's reference run.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray
from repo_paths import REPO_ROOT
from train_job_helpers import TINY_DEMO, tiny_config, write_config

from clip_ray.cli import main
from clip_ray.config import Config, from_dict
from clip_ray.driver.demo import demo_report, prepare_demo
from clip_ray.eval.report import metrics_table
from clip_ray.model.tokenizer import train_bpe_tokenizer

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
