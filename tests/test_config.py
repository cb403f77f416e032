"""Config loading: presets with overrides, `--set` overrides, and one-line errors naming the key."""

import pytest

from clip_ray.config import Config, ConfigError, load_config, to_dict
from clip_ray.config.dataclass_io import from_dict


def test_preset_with_nested_overrides_and_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  preset: ViT-B/32\n  text: {vocab_size: 8192}\n"
        "data:\n  tokenizer: tok.json\n  train: [{path: 'shards/{00000..00003}.tar'}]\n"
        "train: {global_batch_size: 64, accumulation_steps: 2}\n"
        "cluster: {num_workers: 4}\n"
    )
    config = load_config(path, ["train.lr=1e-4", "train.betas=[0.9, 0.95]", "cluster.use_gpu=true"])
    assert config.model.vision.width == 768 and config.model.activation == "quick_gelu"
    assert config.model.text.vocab_size == 8192 and config.model.text.width == 512
    assert config.train.lr == 1e-4 and config.train.betas == (0.9, 0.95)
    assert config.cluster.use_gpu is True
    assert config.data.train[0].path == "shards/{00000..00003}.tar"
    # A config survives the trip through a plain dict (what MLflow params and checkpoints store).
    assert from_dict(Config, to_dict(config)) == config


@pytest.mark.parametrize("overrides, message", [
    (["train.learning_rate=0.1"], "train.learning_rate: unknown key"),
    (["train.steps=ten"], "train.steps='ten': expected an integer"),
    (["train.precision=fp8"], "train.precision='fp8': must be one of"),
    (["train.global_batch_size=100", "cluster.num_workers=3"], "train.global_batch_size=100: must be divisible"),
    (["train.global_batch_size=64", "train.accumulation_steps=3"], "must be divisible by cluster.num_workers"),
    (["model.preset=ViT-Z/99"], "model.preset='ViT-Z/99': unknown model preset"),
    (["model.vision.image_size=100"], "model.vision.image_size=100: must be a multiple of patch_size"),
    (["data.crop_scale=[0.5, 1.5]"], "data.crop_scale=(0.5, 1.5)"),
    (["cluster.num_workers=0"], "cluster.num_workers=0: must be positive"),
    (["cluster.worker_resources={GPU: 1}"], "cluster.worker_resources.GPU=1.0: is set by cpus_per_worker"),
    (["cluster.worker_resources={trainer: 0}"], "cluster.worker_resources.trainer=0.0: must be positive"),
    (["train.lr=-1"], "train.lr=-1.0: must be positive"),
    (["demo.num_train=0"], "demo.num_train=0: must be positive"),
    (["train=3"], "train=3: expected a mapping"),
    (["train.steps"], "must look like key.path=value"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["demo={}", *overrides])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_real_data_needs_sources_and_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="data.tokenizer"):
        load_config(None, ["data.train=[{path: shards}]"])
    with pytest.raises(ConfigError, match=r"data.train\[0\].path"):
        load_config(None, ["data.train=[{format: parquet}]", "data.tokenizer=t.json"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
