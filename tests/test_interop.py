"""Weights in other projects' layouts (clip_ray/model/interop): Hugging Face CLIPModel, OpenCLIP configs,
TorchScript archives.

Every model is random and tiny, built from a config here (nothing is downloaded); the other project's own
code (transformers, open_clip, torch.jit) is the reference the embeddings are compared against, on real
Flickr8k photos and captions tokenized by clip-ray's tokenizers.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer as RustTokenizer

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.config.presets import get_preset
from clip_ray.model import build_model
from clip_ray.model.interop import UnsupportedExport
from clip_ray.model.interop.hf import (
    hf_config_from_model_config, model_config_from_hf, read_hf_folder, relocate_eot_for_hf, state_dict_from_hf,
    state_dict_to_hf,
)
from clip_ray.model.interop.openclip import model_config_from_openclip, openclip_model_config, state_dict_from_openclip
from clip_ray.model.interop.torchscript import UnsafePickleError, is_torchscript_archive, read_torchscript_state_dict
from clip_ray.model.tokenizer import TrainedBpeTokenizer, load_tokenizer, train_bpe_tokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

OPEN_CLIP_DIR = Path(open_clip.__file__).parent
CONTEXT = 16
ATOL = 2e-5


# --- shared inputs: real photos and captions, clip-ray's two tokenizers ------------------------------------

@pytest.fixture(scope="module")
def flickr(flickr8k_dir) -> tuple[list[Image.Image], list[str]]:
    """Four Flickr8k photos and one caption of each."""
    captions: dict[str, str] = {}
    for line in (flickr8k_dir / "captions.csv").read_text(encoding="utf-8").splitlines()[1:]:
        image, caption = line.split(",", 1)
        captions.setdefault(image, caption)
        if len(captions) == 4:
            break
    images = [Image.open(flickr8k_dir / "images" / name).convert("RGB") for name in captions]
    return images, list(captions.values())


def _pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    arrays = [np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 for image in images]
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) - 0.45) / 0.27


@pytest.fixture(scope="module")
def clip_tokenizer():
    """CLIP's BPE (sot 49406, eot 49407, pad 0), from the merges file open_clip ships."""
    return load_tokenizer(OPEN_CLIP_DIR / "bpe_simple_vocab_16e6.txt.gz", context_length=CONTEXT)


@pytest.fixture(scope="module")
def trained_tokenizer(flickr8k_dir) -> TrainedBpeTokenizer:
    """A `bpe:N` tokenizer (pad 0, sot 1, eot 2) trained on Flickr8k captions."""
    lines = (flickr8k_dir / "captions.csv").read_text(encoding="utf-8").splitlines()[1:2001]
    return train_bpe_tokenizer([line.split(",", 1)[1] for line in lines], vocab_size=600, context_length=CONTEXT)


def _features(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features; 4.x a tensor."""
    return F.normalize(getattr(output, "pooler_output", output), dim=-1)


def _assert_same_embeddings(ours: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor,
                            their_images: torch.Tensor, their_texts: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), their_images, atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.encode_text(tokens), their_texts, atol=ATOL, rtol=0)


def _tiny_vit(vocab_size: int, activation: str, **text) -> ModelConfig:
    return ModelConfig(name="tiny", embed_dim=32, activation=activation,
                       vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                       text=TextConfig(context_length=CONTEXT, vocab_size=vocab_size, width=64, layers=2,
                                       head_width=32, **text))


# --- Hugging Face transformers -------------------------------------------------------------------------------

def _hf_model(eos_token_id: int, hidden_act: str = "quick_gelu") -> transformers.CLIPModel:
    torch.manual_seed(0)
    tower = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "hidden_act": hidden_act}
    config = transformers.CLIPConfig(
        projection_dim=32,
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": CONTEXT, "bos_token_id": 49406,
                     "eos_token_id": eos_token_id, "pad_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8})
    return transformers.CLIPModel(config).eval()


@pytest.mark.parametrize("eos_token_id, shard", [(49407, False), (2, True)], ids=["eos-pooling", "legacy-sharded"])
def test_hf_folder_loads_with_equal_embeddings(tmp_path, flickr, clip_tokenizer, eos_token_id, shard):
    """A saved CLIPModel (also sharded, also a legacy eos id 2 config) -> clip-ray: the same embeddings."""
    hf = _hf_model(eos_token_id)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "200KB"} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").is_file() == shard

    if not shard:  # the special tokens as a saved HF tokenizer names them; its pad is the end token
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a</w>": 320}},
            "added_tokens": [{"id": 49406, "content": "<|startoftext|>"}, {"id": 49407, "content": "<|endoftext|>"}]}))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": "<|startoftext|>", "eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>"}))

    state, config, facts = read_hf_folder(str(tmp_path))
    assert facts["eos_token_id"] == 49407 and facts["bos_token_id"] == 49406 and facts["vocab_size"] == 49408
    assert facts["pad_token_id"] == (1 if shard else 49407)
    assert facts["legacy_argmax_pooling"] == (eos_token_id == 2)
    model = build_model(config).eval()
    model.load_state_dict(state, strict=True)

    images, tokens = _pixels(flickr[0], 32), clip_tokenizer(flickr[1])
    with torch.no_grad():
        _assert_same_embeddings(model, images, tokens, _features(hf.get_image_features(pixel_values=images)),
                                _features(hf.get_text_features(input_ids=tokens)))


def test_clip_ray_exports_to_hf_with_equal_embeddings(tmp_path, flickr, clip_tokenizer):
    """clip-ray (GELU) -> config.json + model.safetensors -> CLIPModel.from_pretrained: every weight used,
    the same embeddings."""
    torch.manual_seed(1)
    config = _tiny_vit(49408, "gelu")
    model = build_model(config).eval()
    hf_config = hf_config_from_model_config(config, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file(state_dict_to_hf(model.state_dict(), config), tmp_path / "model.safetensors")

    hf, info = transformers.CLIPModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    images, tokens = _pixels(flickr[0], 32), clip_tokenizer(flickr[1])
    with torch.no_grad():
        _assert_same_embeddings(model, images, tokens, _features(hf.get_image_features(pixel_values=images)),
                                _features(hf.get_text_features(input_ids=tokens)))
    # And back: the exported folder reads as the same model.
    state, read_config, _ = read_hf_folder(str(tmp_path))
    assert read_config.architecture() | {"name": ""} == config.architecture() | {"name": ""}
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_trained_tokenizer_export_moves_the_end_token(tmp_path, flickr, trained_tokenizer):
    """A `bpe:N` model's end token is id 2, which HF reads as 'pool at argmax': refused as is; after
    relocate_eot_for_hf, HF with the moved tokenizer gives clip-ray's text embeddings."""
    torch.manual_seed(2)
    config = _tiny_vit(trained_tokenizer.vocab_size, "quick_gelu")
    model = build_model(config).eval()
    with pytest.raises(UnsupportedExport, match="eos_token_id=2"):
        hf_config_from_model_config(config, bos_token_id=1, eos_token_id=2, pad_token_id=0)

    spec = json.loads(trained_tokenizer.backend.to_str())
    state, moved_spec, eot = relocate_eot_for_hf(model.state_dict(), spec)
    assert eot == trained_tokenizer.vocab_size - 1 and spec == json.loads(trained_tokenizer.backend.to_str())
    moved_tokenizer = TrainedBpeTokenizer(RustTokenizer.from_str(json.dumps(moved_spec)), CONTEXT)
    assert moved_tokenizer.eot_token_id == eot
    hf_config = hf_config_from_model_config(config, bos_token_id=1, eos_token_id=eot, pad_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    save_file(state_dict_to_hf(state, config), tmp_path / "model.safetensors")
    hf = transformers.CLIPModel.from_pretrained(tmp_path).eval()

    captions = flickr[1]
    with torch.no_grad():
        ours = model.encode_text(trained_tokenizer(captions))
        theirs = _features(hf.get_text_features(input_ids=moved_tokenizer(captions)))
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_what_a_clipmodel_cannot_hold_is_refused():
    resnet = get_preset("rn-tiny")
    with pytest.raises(UnsupportedExport, match="ModifiedResNet"):
        state_dict_to_hf(build_model(resnet).state_dict(), resnet)
    with pytest.raises(UnsupportedExport, match="ModifiedResNet"):
        hf_config_from_model_config(resnet, bos_token_id=1, eos_token_id=3, pad_token_id=0)
    siglip = _tiny_vit(49408, "gelu")
    siglip.init_logit_bias = -10.0
    with pytest.raises(UnsupportedExport, match="logit bias"):
        state_dict_to_hf(build_model(siglip).state_dict(), siglip)
    assert issubclass(UnsupportedExport, ValueError)


def test_hf_errors_name_the_tensor_or_key(tmp_path):
    hf = _hf_model(49407)
    hf_config = hf.config.to_dict()
    config = model_config_from_hf(hf_config)
    hf_state = hf.state_dict()

    wrong = dict(hf_state)
    wrong["vision_model.post_layernorm.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match=r"visual\.ln_post\.weight \(from vision_model\.post_layernorm\.weight\): "
                                         r"\(65,\) in the Hugging Face weights, \(64,\) in the model"):
        state_dict_from_hf(wrong, config)
    missing = {k: v for k, v in hf_state.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        state_dict_from_hf(missing, config)
    with pytest.raises(ValueError, match=r"not used .* vision_model\.head\.weight"):
        state_dict_from_hf({**hf_state, "vision_model.head.weight": torch.ones(2)}, config)

    for key, value, message in [("hidden_act", "relu", "text_config.hidden_act='relu'"),
                                ("layer_norm_eps", 1e-6, "text_config.layer_norm_eps=1e-06")]:
        bad = {**hf_config, "text_config": {**hf_config["text_config"], key: value}}
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
            model_config_from_hf(bad)

    # A folder whose weights are a pickle only is refused before anything is read.
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pytorch_model.bin, a pickle"):
        read_hf_folder(str(tmp_path))


# --- OpenCLIP -----------------------------------------------------------------------------------------------

OPENCLIP_VIT = {"embed_dim": 32, "quick_gelu": True,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
OPENCLIP_RESNET = {"embed_dim": 32, "quick_gelu": True,
                   "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 32,
                                  "patch_size": None},
                   "text_cfg": {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def _create_openclip(tmp_path: Path, name: str, cfg: dict, seed: int) -> torch.nn.Module:
    """open_clip.create_model of `cfg`, registered under `name` the way a user registers an exported config."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    return open_clip.create_model(name).eval()


def _openclip_embeddings(model, images, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.mark.parametrize("name, cfg", [("interop-vit", OPENCLIP_VIT), ("interop-rn", OPENCLIP_RESNET)])
def test_openclip_model_loads_with_equal_embeddings(tmp_path, flickr, clip_tokenizer, name, cfg):
    openclip_model = _create_openclip(tmp_path, name, cfg, seed=3)
    config = model_config_from_openclip(cfg, name=name)
    model = build_model(config).eval()
    model.load_state_dict(state_dict_from_openclip({"state_dict": {
        f"module.{k}": v for k, v in openclip_model.state_dict().items()}}), strict=True)
    images, tokens = _pixels(flickr[0], config.vision.image_size), clip_tokenizer(flickr[1])
    _assert_same_embeddings(model, images, tokens, *_openclip_embeddings(openclip_model, images, tokens))


@pytest.mark.parametrize("preset, tokenizer, pool_type", [
    ("vit-tiny", "trained_tokenizer", "eos"), ("rn-tiny", "trained_tokenizer", "eos"),
    ("clip-vocab", "clip_tokenizer", "argmax"),
])
def test_exported_openclip_config_builds_the_same_network(tmp_path, flickr, request, preset, tokenizer, pool_type):
    """openclip_model_config(clip-ray model) -> open_clip.create_model: same keys and shapes; with clip-ray's
    weights loaded, the same embeddings (pooling at the end token of the model's tokenizer)."""
    config = _tiny_vit(49408, "quick_gelu") if preset == "clip-vocab" else get_preset(preset)
    if preset != "clip-vocab":
        config.text.context_length = CONTEXT
    torch.manual_seed(4)
    model = build_model(config).eval()
    cfg = openclip_model_config(config)
    assert cfg["text_cfg"]["pool_type"] == pool_type
    assert model_config_from_openclip(cfg, name=config.name).architecture() == config.architecture()
    openclip_model = _create_openclip(tmp_path, f"interop-export-{preset}", cfg, seed=5)
    theirs = openclip_model.state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in model.state_dict().items()}
    openclip_model.load_state_dict(model.state_dict(), strict=True)
    images, tokens = _pixels(flickr[0], config.vision.image_size), request.getfixturevalue(tokenizer)(flickr[1])
    _assert_same_embeddings(model, images, tokens, *_openclip_embeddings(openclip_model, images, tokens))


@pytest.mark.parametrize("openclip_name, preset", [
    ("ViT-B-32-quickgelu", "ViT-B/32"), ("RN50-quickgelu", "RN50"), ("ViT-H-14", "ViT-H/14"),
])
def test_openclip_shipped_configs_equal_the_presets(openclip_name, preset):
    cfg = json.loads((OPEN_CLIP_DIR / "model_configs" / f"{openclip_name}.json").read_text())
    assert model_config_from_openclip(cfg, name=preset).architecture() == get_preset(preset).architecture()


@pytest.mark.parametrize("section, key, value", [
    ("vision_cfg", "timm_model_name", "vit_base_patch16_224"), ("text_cfg", "hf_model_name", "roberta-base"),
    ("vision_cfg", "ls_init_value", 1e-5), ("text_cfg", "no_causal_mask", True), ("text_cfg", "pool_type", "last"),
    ("text_cfg", "norm_kwargs", {"eps": 1e-6}), (None, "multimodal_cfg", {"layers": 12}),
])
def test_openclip_configs_clip_ray_cannot_build_are_refused(section, key, value):
    cfg = json.loads(json.dumps(OPENCLIP_VIT))
    (cfg[section] if section else cfg)[key] = value
    with pytest.raises(ValueError, match=(f"{section}." if section else "") + key):
        model_config_from_openclip(cfg)


# --- TorchScript archives -----------------------------------------------------------------------------------

def test_torchscript_archive_weights_read_without_running_it(tmp_path):
    """A traced clip-ray ResNet model (BatchNorm buffers, OpenAI's '-1' pool names) with an OpenAI-style
    metadata buffer: the reader gives its state dict exactly, less the metadata."""
    torch.manual_seed(6)
    model = build_model("rn-tiny").eval()
    model.register_buffer("input_resolution", torch.tensor(64))
    images, tokens = torch.randn(1, 3, 64, 64), torch.randint(1, 100, (1, 8))
    with torch.no_grad():
        traced = torch.jit.trace_module(model, {"encode_image": images, "encode_text": tokens}, check_trace=False)
    path = tmp_path / "RN-tiny.pt"
    torch.jit.save(traced, path)
    assert is_torchscript_archive(path)

    state = read_torchscript_state_dict(path)
    expected = {k: v for k, v in model.state_dict().items() if k != "input_resolution"}
    assert list(state) == list(expected)
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name

    # OpenAI's archives hold fp16 weights: storages of another dtype read back bit for bit.
    torch.jit.save(traced.half(), tmp_path / "RN-tiny-fp16.pt")
    half = read_torchscript_state_dict(tmp_path / "RN-tiny-fp16.pt")
    for name, tensor in expected.items():
        want = tensor.half() if tensor.is_floating_point() else tensor
        assert half[name].dtype == want.dtype and torch.equal(half[name], want), name

    torch.save(model.state_dict(), tmp_path / "plain.pt")  # torch.save's zip has data.pkl but no code
    assert not is_torchscript_archive(tmp_path / "plain.pt")


class _Payload:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function, named", [(os.system, f"{os.system.__module__}.system"),
                                             (builtins.eval, "builtins.eval")])
def test_torchscript_archive_with_foreign_globals_is_refused(tmp_path, function, named):
    marker = tmp_path / "ran"
    argument = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload := pickle.dumps(_Payload(function, argument), protocol=2,
                                                                  fix_imports=False))
        archive.writestr("evil/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        archive.writestr("evil/version", "3\n")
    assert is_torchscript_archive(path)
    with pytest.raises(UnsafePickleError, match=f"refusing global {named}"):
        read_torchscript_state_dict(path)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: a plain unpickler runs it
    assert marker.exists()
