"""model.init_from: other projects' weights start a run, fitted to the configured model and checked.

Everything is random and local: OpenCLIP and transformers models are built from configs, never
downloaded. The driver's preparation (read, convert, fit, check the tokenizer, write one safetensors
file) runs for real, and the worker's half loads that file into a fresh model.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import open_clip
import pytest
import torch
from open_clip.model import resize_pos_embed, resize_text_pos_embed

from clip_ray.config import ConfigError, load_config, to_dict
from clip_ray.driver.init_weights import SOURCE_TAG, prepare_initial_weights
from clip_ray.inference.models import ModelSourceError, resolve_model
from clip_ray.model import build_model
from clip_ray.model.initial_weights import fit_initial_weights, load_initial_weights, read_prepared_weights
from clip_ray.model.tokenizer import load_tokenizer, train_bpe_tokenizer

CLIP_BPE = str(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz")
VISION = {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32}
TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "layers": 2, "head_width": 32}


def _openclip_model() -> torch.nn.Module:
    """OpenCLIP's own CLIP class, randomly initialised, shaped like VISION/TEXT with QuickGELU."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=48, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, layers=2, heads=2))
    return model.eval()


@pytest.fixture(scope="module")
def openclip_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = _openclip_model()
    path = tmp_path_factory.mktemp("openclip") / "open_clip_model.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _config(tmp_path: Path, init_from: str, tokenizer: str = CLIP_BPE, **overrides):
    vision, text = {**VISION, **overrides.pop("vision", {})}, {**TEXT, **overrides.pop("text", {})}
    sets = [f"model.init_from={init_from}", "model.embed_dim=48", "model.activation=quick_gelu",
            *[f"model.vision.{k}={v}" for k, v in vision.items()], *[f"model.text.{k}={v}" for k, v in text.items()],
            f"data.train=[{{path: '{tmp_path}'}}]", f"data.tokenizer={tokenizer}",
            f"cluster.storage_path={tmp_path / 'storage'}", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            *[f"model.{k}={v}" for k, v in overrides.items()]]
    return load_config(None, sets)


def _worker_model(config) -> torch.nn.Module:
    """What a worker's start_run does with the prepared file."""
    torch.manual_seed(123)  # another init than the source's: only the loaded weights can make them agree
    model = build_model(config.model)
    fitted, _ = fit_initial_weights(read_prepared_weights(config.model.init_from), config.model,
                                    config.model.init_from_towers)
    load_initial_weights(model, fitted, config.model.init_from_towers)
    return model.eval()


def _embeddings(model, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return (torch.nn.functional.normalize(model.encode_image(images), dim=-1),
                torch.nn.functional.normalize(model.encode_text(tokens), dim=-1))


def test_an_openclip_state_dict_starts_the_run_with_its_embeddings(openclip_file, tmp_path):
    path, reference = openclip_file
    config = _config(tmp_path, str(path))
    prepare_initial_weights(config)
    assert config.model.init_from.startswith(str(tmp_path / "storage" / "init-weights"))
    assert config.tracking.tags[SOURCE_TAG] == str(path) and config.tracking.tags[f"{SOURCE_TAG}.kind"] == "state_dict"
    model = _worker_model(config)
    images = torch.randn(3, 3, 32, 32)
    tokens = load_tokenizer(CLIP_BPE, 77)(["a dog on a beach", "two cats", "a red bicycle"])
    ours, theirs = _embeddings(model, images, tokens), _embeddings(reference, images, tokens)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)


def test_positional_embeddings_are_resized_as_openclip_resizes_them(openclip_file, tmp_path):
    path, reference = openclip_file
    config = _config(tmp_path, str(path), vision={"image_size": 48}, text={"context_length": 32})
    prepare_initial_weights(config)
    assert "visual.positional_embedding resized from (17, 64) to (37, 64)" in config.tracking.tags[f"{SOURCE_TAG}.resized"]
    fitted = read_prepared_weights(config.model.init_from)
    # OpenCLIP's own functions, on a model shaped like the target, give the same tensors.
    expected = dict(reference.state_dict())
    target = open_clip.model.CLIP(
        embed_dim=48, quick_gelu=True,
        vision_cfg=open_clip.model.CLIPVisionCfg(image_size=48, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=32, vocab_size=49408, width=64, layers=2, heads=2))
    resize_pos_embed(expected, target)
    resize_text_pos_embed(expected, target)
    for key in ("visual.positional_embedding", "positional_embedding"):
        torch.testing.assert_close(fitted[key], expected[key], atol=1e-6, rtol=1e-6)
    model = _worker_model(config)
    features = model.encode_image(torch.randn(2, 3, 48, 48))
    assert features.shape == (2, 48) and torch.isfinite(features).all()


def test_a_wrong_shape_or_a_missing_tensor_is_named(openclip_file, tmp_path):
    path, _ = openclip_file
    with pytest.raises(ConfigError, match=r"tensor text_projection has shape \(64, 48\), this model's is \(64, 40\)"):
        prepare_initial_weights(_config(tmp_path, str(path), embed_dim=40))
    with pytest.raises(ConfigError, match=r"lack .*visual\.transformer\.resblocks\.2\."):
        prepare_initial_weights(_config(tmp_path, str(path), vision={"layers": 3}))


def test_the_tokenizer_must_match_the_weights(openclip_file, tmp_path):
    path, _ = openclip_file
    trained = train_bpe_tokenizer(["a dog on a beach", "two cats on a sofa"] * 20, vocab_size=300)
    trained.save(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"has \d+ tokens, the text tower of model.init_from=.* 49408"):
        prepare_initial_weights(_config(tmp_path, str(path), tokenizer=str(tmp_path / "tokenizer.json")))
    # The image tower alone does not read token ids: LiT with a fresh text tower and its own tokenizer.
    config = _config(tmp_path, str(path), tokenizer=str(tmp_path / "tokenizer.json"), init_from_towers="image",
                     text={"vocab_size": 300})
    prepare_initial_weights(config)
    fitted = read_prepared_weights(config.model.init_from)
    assert fitted and all(key.startswith("visual.") for key in fitted)


def test_image_tower_only_leaves_the_text_tower_at_its_fresh_init(openclip_file, tmp_path):
    path, reference = openclip_file
    config = _config(tmp_path, str(path), init_from_towers="image")
    prepare_initial_weights(config)
    model = _worker_model(config)
    torch.manual_seed(123)
    fresh = build_model(config.model)
    for key, value in model.state_dict().items():
        source = reference.state_dict()[key] if key.startswith("visual.") else fresh.state_dict()[key]
        assert torch.equal(value, source), key


def test_a_source_config_that_computes_otherwise_is_refused(tmp_path):
    """Same shapes, other activation: only the source's recorded config can tell."""
    torch.manual_seed(0)
    source = _config(tmp_path, "unused").model
    source.activation = "gelu"
    model = build_model(source)
    weights = model.state_dict()
    target = _config(tmp_path, "unused").model
    with pytest.raises(ConfigError, match=r"model.activation='quick_gelu': the weights .* trained with 'gelu'"):
        fit_initial_weights(weights, target, "both", source)


def test_a_pickled_mlflow_model_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as run:
            # Claims to be clip-ray's (its metadata has a model config), but is pickled.
            mlflow.pytorch.log_model(build_model(_config(tmp_path, "unused").model), name="model",
                                     pip_requirements=["torch"], serialization_format="pickle",
                                     metadata={"model_config": to_dict(_config(tmp_path, "unused").model)})
    finally:
        mlflow.set_tracking_uri(None)
    with pytest.raises(ModelSourceError, match=r"pickled MLflow model \(.*model\.pth.*unpickling runs code"):
        resolve_model(f"runs:/{run.info.run_id}/model", tokenizer=CLIP_BPE, tracking_uri=uri).state_dict()
    config = _config(tmp_path, f"runs:/{run.info.run_id}/model")
    with pytest.raises(ModelSourceError, match="pickled MLflow model"):
        prepare_initial_weights(config)


def test_a_hugging_face_clipmodel_folder_starts_the_run_with_its_embeddings(tmp_path):
    """A transformers CLIPModel built from a config and saved: names and layouts converted, same embeddings."""
    transformers = pytest.importorskip("transformers", reason="the export extra (pip install -e .[export])")
    torch.manual_seed(0)
    tower = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": "quick_gelu"}
    hf = transformers.CLIPModel(transformers.CLIPConfig(
        projection_dim=48,
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8})).eval()
    hf.save_pretrained(tmp_path / "hf")
    config = _config(tmp_path, str(tmp_path / "hf"))
    prepare_initial_weights(config)
    assert config.tracking.tags[f"{SOURCE_TAG}.kind"] == "huggingface"
    model = _worker_model(config)
    images = torch.randn(2, 3, 32, 32)
    tokens = load_tokenizer(CLIP_BPE, 77)(["a dog on a beach", "two cats"])
    ours = _embeddings(model, images, tokens)
    with torch.no_grad():
        # transformers 5 returns an output whose pooler_output holds the projected features, 4.x the tensor
        theirs = tuple(torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)
                       for out in (hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=tokens)))
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)


def test_torchscript_archives_and_openclip_training_checkpoints_are_read(openclip_file, tmp_path):
    """OpenAI's release format (a TorchScript archive, read without running it) and OpenCLIP's training
    checkpoint ({"epoch", "state_dict" with DDP's "module." prefix, ...}) give the same prepared weights."""
    path, reference = openclip_file
    images, tokens = torch.randn(1, 3, 32, 32), torch.randint(1, 49000, (1, 77))
    with torch.no_grad():
        traced = torch.jit.trace_module(reference, {"encode_image": images, "encode_text": tokens}, check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-tiny.pt")
    torch.save({"epoch": 3, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
               tmp_path / "epoch_3.pt")
    prepared = {}
    for name, kind in (("ViT-tiny.pt", "torchscript"), ("epoch_3.pt", "state_dict")):
        config = _config(tmp_path, str(tmp_path / name))
        prepare_initial_weights(config)
        assert config.tracking.tags[f"{SOURCE_TAG}.kind"] == kind
        prepared[name] = read_prepared_weights(config.model.init_from)
    for key, value in reference.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(prepared["ViT-tiny.pt"][key], value) and torch.equal(prepared["epoch_3.pt"][key], value)


def test_a_uri_source_is_read_through_pyarrow(openclip_file, tmp_path):
    path, reference = openclip_file
    config = _config(tmp_path, f"file://{path}")
    prepare_initial_weights(config)
    prepared = read_prepared_weights(config.model.init_from)
    assert all(torch.equal(prepared[key], value) for key, value in reference.state_dict().items() if key != "attn_mask")
