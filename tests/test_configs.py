"""The YAML presets under configs/: each loads and validates, and each says what it claims."""

from __future__ import annotations

from pathlib import Path

import pytest
from repo_paths import REPO_ROOT

from clip_ray.config import load_config
from clip_ray.driver.prepare import prepare_job
from clip_ray.model.tokenizer import load_tokenizer

# Training job configs; a sweep's file (sweep-*.yaml) has its own schema and tests.
CONFIGS = sorted(p for p in (REPO_ROOT / "configs").glob("*.yaml") if not p.name.startswith("sweep-"))


def test_the_documented_presets_exist():
    assert {path.name for path in CONFIGS} >= {"demo-cpu.yaml", "flickr8k-cpu.yaml", "vit-b32-cluster.yaml",
                                               "rn50-cluster.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_config_loads_and_validates(path):
    config = load_config(path)
    per_worker, remainder = divmod(config.train.global_batch_size, config.cluster.num_workers)
    assert remainder == 0 and per_worker > 0


def test_demo_config_is_a_small_cpu_job_on_generated_data():
    config = load_config(REPO_ROOT / "configs" / "demo-cpu.yaml")
    assert config.demo is not None and not config.data.train, "the job fills data.* from the demo section"
    assert config.data.tokenizer.startswith("bpe:")
    assert not config.cluster.use_gpu and config.cluster.num_workers == 1
    assert config.train.precision == "fp32" and config.train.eval_every > 0, "evaluated before and after"
    assert config.demo.held_out_classes(), "zero-shot is measured on held-out combinations"


@pytest.mark.parametrize("name, preset", [("vit-b32-cluster.yaml", "ViT-B/32"), ("rn50-cluster.yaml", "RN50")])
def test_cluster_configs_follow_the_paper(name, preset):
    config = load_config(REPO_ROOT / "configs" / name)
    train = config.train
    assert config.model.name == preset
    assert train.global_batch_size == 32768 and train.warmup_steps == 2000 and train.precision == "bf16"
    assert train.lr == 5e-4 and train.weight_decay == 0.2 and train.betas is None, "the paper's values"
    assert train.steps * train.global_batch_size == pytest.approx(12.8e9, rel=1e-3), "32 epochs of 400M pairs"
    assert config.cluster.use_gpu and config.cluster.num_workers >= 32
    assert config.cluster.storage_path.startswith("s3://")
    assert all(source.path.startswith("s3://") and source.format == "webdataset" for source in config.data.train)
    assert config.data.tokenizer.endswith("bpe_simple_vocab_16e6.txt.gz")
    assert config.model.text.vocab_size == 49408, "CLIP's BPE vocabulary"


def test_the_vit_h14_config_shards_with_fsdp():
    config = load_config(REPO_ROOT / "configs" / "vit-h14-cluster.yaml")
    assert config.model.name == "ViT-H/14" and config.model.grad_checkpointing
    assert config.train.strategy == "fsdp" and config.train.precision == "bf16"
    assert config.cluster.worker_resources == {"trainer": 1.0}


def test_flickr8k_config_paths_resolve_from_the_repository_root(flickr8k_dir, cifar10_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # relative paths resolve against the working directory
    config = load_config("configs/flickr8k-cpu.yaml", [f"cluster.storage_path={tmp_path}"])
    prepared = prepare_job(config).config  # trains the 'bpe:4096' tokenizer on the training captions; checks inputs
    assert Path(prepared.data.train[0].path).resolve() == flickr8k_dir.resolve()
    assert Path(prepared.data.val[0].path).resolve() == flickr8k_dir.resolve()
    assert prepared.data.train[0].split_file == "splits/train.txt"
    assert prepared.data.val[0].split_file == "splits/test.txt"
    assert Path(prepared.data.zeroshot_dir).resolve() == cifar10_dir.resolve()
    tokenizer = load_tokenizer(prepared.data.tokenizer, prepared.model.text.context_length)
    assert Path(prepared.data.tokenizer).parent == tmp_path / "tokenizers"
    assert 1000 < tokenizer.vocab_size <= prepared.model.text.vocab_size
    # The same config finds the same tokenizer instead of training another.
    assert prepare_job(config).config.data.tokenizer == prepared.data.tokenizer
