"""Presets match the published models; scaling grows models monotonically; parameter
and FLOP counts agree with an analytic count. Big models are only built on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clip_ray.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from clip_ray.model import build_model, get_preset, list_presets, model_stats, scale_model

# Parameter counts of OpenAI's released models (OpenCLIP's CLIP class agrees, logit_scale included).
PUBLISHED_PARAMS = {
    "ViT-B/32": 151_277_313,
    "ViT-B/16": 149_620_737,
    "ViT-L/14": 427_616_513,
    "ViT-L/14@336": 427_944_193,
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
}

# OpenCLIP's ViT-H-14, ViT-g-14 and ViT-bigG-14 (open_clip.create_model(...).parameters(), logit_scale included).
OPENCLIP_PARAMS = {
    "ViT-H/14": 986_109_441,
    "ViT-g/14": 1_366_678_273,
    "ViT-bigG/14": 2_539_567_105,
}


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_published_presets_have_published_parameter_counts(name):
    model = build_model(name, device="meta")
    assert param_count(model) == PUBLISHED_PARAMS[name]
    assert model.config.activation == "quick_gelu"
    assert (model.config.text.vocab_size, model.config.text.context_length) == (49408, 77)


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_and_runs_on_meta(name):
    model = build_model(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert model.config.name == name
    config = model.config
    size = config.vision.image_size
    images = torch.empty(2, 3, size, size, device="meta")
    tokens = torch.zeros(2, config.text.context_length, dtype=torch.long, device="meta")
    with torch.no_grad():
        out = model(images, tokens)
    assert out.image_features.shape == out.text_features.shape == (2, config.embed_dim)


@pytest.mark.parametrize("name", OPENCLIP_PARAMS)
def test_openclip_presets_have_openclip_parameter_counts(name):
    """Exact counts pin OpenCLIP's truncated MLP widths (int(1408 * 4.3637) = 6144, int(1664 * 4.9231) = 8192)."""
    model = build_model(name, device="meta")
    assert param_count(model) == OPENCLIP_PARAMS[name]
    assert model.config.activation == "gelu"
    assert get_preset(name.replace("/", "-")).name == name


def test_mlp_ratio_sets_the_hidden_width_and_is_checked():
    model = build_model("ViT-g/14", device="meta")
    assert model.visual.transformer.resblocks[0].mlp.c_fc.out_features == 6144
    assert model.transformer.resblocks[0].mlp.c_fc.out_features == 4096
    for ratio in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="mlp_ratio"):
            VisionConfig(mlp_ratio=ratio).validate()
        with pytest.raises(ConfigError, match="mlp_ratio"):
            TextConfig(mlp_ratio=ratio).validate()


def test_small_presets_are_small():
    for name in ("vit-tiny", "vit-small-cpu", "rn-tiny"):
        assert param_count(build_model(name, device="meta")) < 15_000_000
    assert set(PUBLISHED_PARAMS) | set(OPENCLIP_PARAMS) < set(list_presets())


def test_preset_names_are_case_insensitive_and_accept_open_clip_spelling():
    assert get_preset("vit-b/32") == get_preset("ViT-B/32") == get_preset("ViT-B-32")
    assert get_preset("vit-l-14-336").vision.image_size == 336
    assert get_preset("VIT-TINY").name == "vit-tiny"
    with pytest.raises(KeyError, match="ViT-B/32"):
        get_preset("ViT-B/33")


def test_get_preset_returns_a_copy():
    get_preset("vit-tiny").vision.width = 1
    assert get_preset("vit-tiny").vision.width == 128


# --------------------------------------------------------------------------- scaling


def test_scaling_rn50_by_four_lands_near_rn50x4():
    """The paper's RN50x4 is RN50 with ~4x compute; our rule reproduces its width and resolution."""
    scaled = scale_model(get_preset("RN50"), 4)
    published = get_preset("RN50x4")
    assert scaled.vision.width == published.vision.width == 80
    assert scaled.vision.image_size == published.vision.image_size == 288
    assert scaled.text.width == published.text.width == 640
    assert scaled.vision.resnet_layers == (5, 6, 10, 5)  # published (4, 6, 10, 6): same total depth
    assert scaled.name == "RN50-x4"
    ratio = model_stats(scaled)["flops_image"] / model_stats(get_preset("RN50"))["flops_image"]
    assert 3.5 < ratio < 4.5


def test_scaling_vit_multiplies_widths():
    scaled = scale_model(get_preset("vit-tiny"), 2)
    assert (scaled.vision.width, scaled.text.width, scaled.embed_dim) == (256, 256, 256)
    assert (scaled.vision.layers, scaled.vision.image_size) == (4, 64)
    assert scale_model(get_preset("vit-tiny"), 1) == dataclasses.replace(get_preset("vit-tiny"), name="vit-tiny-x1")
    # Widths stay whole heads, and never fall below one head.
    assert scale_model(get_preset("vit-tiny"), 1.2).vision.width == 160  # 153.6 -> 5 heads of 32
    tiny = scale_model(get_preset("vit-tiny"), 0.01)
    assert (tiny.vision.width, tiny.text.width, tiny.embed_dim) == (32, 32, 32)
    with pytest.raises(ValueError):
        scale_model(get_preset("vit-tiny"), 0)


@pytest.mark.parametrize("name", ["vit-tiny", "rn-tiny"])
def test_scaling_grows_parameters_and_flops_monotonically(name):
    """Totals strictly grow; a single tower may stand still where rounding to whole heads absorbs a step."""
    stats = [model_stats(scale_model(get_preset(name), f)) for f in (0.5, 1, 2, 4, 8)]
    for smaller, larger in zip(stats, stats[1:]):
        for key in ("params_total", "flops_per_sample", "flops_image", "params_vision"):
            assert larger[key] > smaller[key], key
        for key in ("params_text", "flops_text"):
            assert larger[key] >= smaller[key], key
    assert stats[-1]["params_text"] > stats[1]["params_text"]


# --------------------------------------------------------------------------- stats


def transformer_flops(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
    """2 FLOPs per multiply-add: qkv, q@k, attn@v, output projection, two MLP matmuls (attention counted full)."""
    hidden = int(width * mlp_ratio)
    per_layer = tokens * width * 3 * width + 2 * tokens * tokens * width + tokens * width * width \
        + 2 * tokens * width * hidden
    return 2 * layers * per_layer


def vit_flops(config: ModelConfig) -> int:
    v = config.vision
    patches = (v.image_size // v.patch_size) ** 2
    patch_embedding = 2 * patches * 3 * v.patch_size ** 2 * v.width
    return patch_embedding + transformer_flops(patches + 1, v.width, v.layers, v.mlp_ratio) \
        + 2 * v.width * config.embed_dim


def text_flops(config: ModelConfig) -> int:
    t = config.text
    return transformer_flops(t.context_length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * config.embed_dim


ODD_VIT = ModelConfig(
    embed_dim=24, vision=VisionConfig(image_size=20, patch_size=4, width=32, layers=3, head_width=16, mlp_ratio=2.0),
    text=TextConfig(context_length=9, vocab_size=50, width=48, layers=2, head_width=16))


@pytest.mark.parametrize("config", [ODD_VIT, get_preset("vit-tiny"), get_preset("ViT-B/32")],
                         ids=["odd", "vit-tiny", "ViT-B/32"])
def test_measured_flops_equal_the_analytic_count(config):
    """Exact equality also proves attention (SDPA) is counted: drop its term and the sums differ."""
    stats = model_stats(config)
    assert stats["flops_image"] == vit_flops(config)
    assert stats["flops_text"] == text_flops(config)
    assert stats["flops_per_sample"] == stats["flops_image"] + stats["flops_text"]


def test_vit_b32_image_tower_is_4_4_gmacs():
    """The counter reports 2 x MACs: ViT-B/32's image tower is the widely quoted 4.4 GMACs = 8.8 GFLOPs."""
    assert model_stats(get_preset("ViT-B/32"))["flops_image"] == 8_817_623_040


@pytest.mark.parametrize("name", ["ViT-B/32", "RN50", "rn-tiny"])
def test_parameter_split_between_towers(name):
    stats = model_stats(get_preset(name))
    model = build_model(name, device="meta")
    assert stats["params_vision"] == param_count(model.visual)
    assert stats["params_vision"] + stats["params_text"] + 1 == stats["params_total"] == param_count(model)
    text = model.config.text
    embeddings = (text.vocab_size + text.context_length) * text.width
    assert stats["params_text"] > embeddings + text.width * model.config.embed_dim
    assert stats["flops_image"] > 0 and stats["flops_text"] > 0
