"""OpenAI state-dict layout: our keys and shapes are OpenCLIP's, weights move both ways
with strict=True and give the same features, and a config is read back from weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from open_clip.model import CLIP as OpenCLIP

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.model import (
    build_model, build_model_from_state_dict, get_preset, list_presets, model_config_from_state_dict,
)

SMALL_VIT = ModelConfig(
    name="small-vit", embed_dim=48, activation="quick_gelu",
    vision=VisionConfig(image_size=32, width=64, layers=2, patch_size=8, head_width=32),
    text=TextConfig(context_length=12, vocab_size=100, width=64, layers=2, head_width=32))
SMALL_RESNET = ModelConfig(
    name="small-resnet", embed_dim=48, activation="gelu",
    vision=VisionConfig(arch="resnet", image_size=64, width=16, resnet_layers=(1, 2, 1, 1), head_width=64),
    text=TextConfig(context_length=12, vocab_size=100, width=64, layers=1, head_width=32))


def open_clip_model(config: ModelConfig) -> OpenCLIP:
    """OpenCLIP's own CLIP class, configured like `config`: the reference for OpenAI's layout."""
    v, t = config.vision, config.text
    vision_cfg = dict(image_size=v.image_size, width=v.width, head_width=v.head_width, mlp_ratio=v.mlp_ratio,
                      layers=v.layers if v.arch == "vit" else v.resnet_layers, patch_size=v.patch_size)
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                    heads=t.width // t.head_width, layers=t.layers, mlp_ratio=t.mlp_ratio)
    return OpenCLIP(config.embed_dim, vision_cfg, text_cfg, quick_gelu=config.activation == "quick_gelu")


def openai_style_tokens(batch: int, config: TextConfig, seed: int = 0) -> torch.Tensor:
    """Random captions of random length ending in EOT (the largest id, as in OpenAI's vocabulary), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, config.context_length, dtype=torch.long)
    for row in range(batch):
        length = int(torch.randint(2, config.context_length + 1, (1,), generator=g))
        tokens[row, : length - 1] = torch.randint(1, config.vocab_size - 1, (length - 1,), generator=g)
        tokens[row, length - 1] = config.vocab_size - 1
    return tokens


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


@pytest.mark.parametrize("config", [SMALL_VIT, SMALL_RESNET], ids=["vit", "resnet"])
def test_keys_and_shapes_are_open_clips(config):
    ours = shapes(build_model(config).state_dict())
    reference = shapes(open_clip_model(config).state_dict())
    assert ours == reference
    assert "logit_scale" in ours and "text_projection" in ours and "token_embedding.weight" in ours
    assert not any(key.startswith("text.") or "attn_mask" in key for key in ours)


@pytest.mark.parametrize("config", [SMALL_VIT, SMALL_RESNET], ids=["vit", "resnet"])
def test_open_clip_weights_give_open_clip_features(config):
    torch.manual_seed(0)
    reference = open_clip_model(config).eval()
    with torch.no_grad():  # OpenCLIP leaves some tensors at init values that would hide a mix-up; randomise all.
        for key, value in reference.state_dict().items():
            if key.endswith("running_var"):
                value.uniform_(0.5, 2.0)
            elif value.is_floating_point():
                value.normal_(0, 0.1)
    ours = build_model(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    ours.eval()

    images = torch.randn(3, 3, config.vision.image_size, config.vision.image_size)
    tokens = openai_style_tokens(3, config.text)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), reference.encode_image(images, normalize=True))
        torch.testing.assert_close(ours.encode_text(tokens), reference.encode_text(tokens, normalize=True))
        torch.testing.assert_close(ours.encode_text(tokens, normalize=False), reference.encode_text(tokens))
        torch.testing.assert_close(ours.logit_scale.exp(), reference.logit_scale.exp())

    # And back: our weights load into OpenCLIP.
    fresh = open_clip_model(config)
    fresh.load_state_dict(build_model(config).state_dict(), strict=True)


def without_uninferable(config: ModelConfig) -> ModelConfig:
    """Head counts, activation and name are not stored in weights; everything else must round-trip. The
    weights hold the MLP's width, not the ratio it came from (OpenCLIP's ViT-g/14 says 4.3637 for 6144 / 1408):
    both sides are compared by the width they build."""
    def tower(tower_config):
        hidden = int(tower_config.width * tower_config.mlp_ratio)  # as the towers build their MLP
        return dataclasses.replace(tower_config, head_width=1, mlp_ratio=hidden / tower_config.width)

    return dataclasses.replace(config, name="", activation="gelu", vision=tower(config.vision),
                               text=tower(config.text))


@pytest.mark.parametrize("name", list_presets())
def test_config_inferred_from_weights_of_every_preset(name):
    config = get_preset(name)
    inferred = model_config_from_state_dict(build_model(config, device="meta").state_dict())
    assert without_uninferable(inferred) == without_uninferable(config)
    if config.activation == "quick_gelu":  # the published models: OpenAI's 64-wide heads are recovered
        assert inferred.vision.head_width == config.vision.head_width == 64
        assert inferred.text.head_width == config.text.head_width == 64


def test_config_inference_sees_logit_bias_and_mlp_ratio():
    config = dataclasses.replace(SMALL_VIT, init_logit_bias=-10.0,
                                 text=dataclasses.replace(SMALL_VIT.text, mlp_ratio=2.0))
    state_dict = build_model(config).state_dict()
    assert "logit_bias" in state_dict
    inferred = model_config_from_state_dict(state_dict, head_width=32)
    assert inferred.init_logit_bias == -10.0
    assert inferred.text.mlp_ratio == 2.0
    assert dataclasses.replace(inferred, name=config.name, activation=config.activation) == config
    assert "logit_bias" not in build_model(SMALL_VIT).state_dict()


def test_build_from_state_dict_restores_the_model():
    original = build_model(SMALL_VIT).eval()
    # As OpenAI's TorchScript archives ship it: half precision plus three metadata scalars.
    state_dict = {key: value.half() for key, value in original.state_dict().items()}
    state_dict.update(input_resolution=torch.tensor(32), context_length=torch.tensor(12),
                      vocab_size=torch.tensor(100))
    restored = build_model_from_state_dict(state_dict, activation="quick_gelu", head_width=32).eval()
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in restored.parameters())
    assert dataclasses.replace(restored.config, name=SMALL_VIT.name) == SMALL_VIT

    original.half().float()  # the same rounding the checkpoint went through
    images = torch.randn(2, 3, 32, 32)
    tokens = openai_style_tokens(2, SMALL_VIT.text)
    with torch.no_grad():
        torch.testing.assert_close(restored(images, tokens), original(images, tokens))


def test_build_from_state_dict_is_strict():
    state_dict = build_model(SMALL_RESNET).state_dict()
    restored = build_model_from_state_dict(state_dict, activation="gelu")
    torch.testing.assert_close(restored.state_dict(), state_dict)
    del state_dict["ln_final.bias"]
    with pytest.raises(RuntimeError, match="ln_final.bias"):
        build_model_from_state_dict(state_dict)
