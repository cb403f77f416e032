"""Behaviour of the CLIP model on tiny configs: shapes, end-of-text readout, activations,
initialisation, temperature, and the scale knobs (bf16, checkpointing, patch dropout, compile)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from clip_ray.config import ModelConfig, TextConfig, VisionConfig
from clip_ray.model import CLIP, ClipOutput, build_model, clamp_logit_scale, get_preset
from clip_ray.model.layers import QuickGELU
from clip_ray.model.text import TextTransformer, end_of_text_positions
from clip_ray.model.vit import VisionTransformer

TEXT = TextConfig(context_length=10, vocab_size=64, width=32, layers=2, head_width=16)
TINY_VIT = ModelConfig(embed_dim=24, text=TEXT,
                       vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, head_width=16))
TINY_RESNET = ModelConfig(embed_dim=24, text=TEXT,
                          vision=VisionConfig(arch="resnet", image_size=64, width=8, resnet_layers=(1, 1, 1, 1),
                                              head_width=32))


def images_for(config: ModelConfig, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, config.vision.image_size, config.vision.image_size,
                       generator=torch.Generator().manual_seed(1))


def tokens_for(config: ModelConfig, batch: int = 3) -> torch.Tensor:
    """Captions of lengths 3, 5, 7... ending in an EOT id, padded with pad_token_id."""
    text = config.text
    tokens = torch.full((batch, text.context_length), text.pad_token_id)
    for row in range(batch):
        length = min(3 + 2 * row, text.context_length)
        tokens[row, :length] = torch.randint(1, text.vocab_size, (length,),
                                             generator=torch.Generator().manual_seed(row))
    return tokens


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET, get_preset("vit-tiny"), get_preset("rn-tiny")],
                         ids=["vit", "resnet", "vit-tiny", "rn-tiny"])
def test_forward_shapes_and_unit_features(config):
    torch.manual_seed(0)
    model = build_model(config)
    out = model(images_for(config, 2), tokens_for(config, 2))
    assert isinstance(out, ClipOutput)
    assert out.image_features.shape == out.text_features.shape == (2, config.embed_dim)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(2))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert out.logit_bias is None
    assert model.encode_image(images_for(config, 2), normalize=False).norm(dim=-1).sub(1).abs().max() > 1e-3


def test_logit_bias_is_a_parameter_when_configured():
    model = build_model(dataclasses.replace(TINY_VIT, init_logit_bias=-10.0))
    out = model(images_for(TINY_VIT), tokens_for(TINY_VIT))
    assert out.logit_bias.item() == -10.0 and out.logit_bias.requires_grad


def test_text_features_are_read_at_the_last_non_pad_token():
    # OpenAI ids (EOT 49407 is the largest) and a trained tokenizer's (EOT 2 is small, pad 1).
    openai = torch.tensor([[49406, 320, 1929, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0]])
    assert end_of_text_positions(openai, pad_token_id=0).tolist() == [3, 1]
    trained = torch.tensor([[0, 500, 700, 2, 1, 1], [0, 900, 800, 600, 400, 2]])
    assert end_of_text_positions(trained, pad_token_id=1).tolist() == [3, 5]

    config = dataclasses.replace(TINY_VIT, text=dataclasses.replace(TEXT, pad_token_id=1))
    torch.manual_seed(0)
    model = build_model(config).eval()
    caption = torch.tensor([[0, 50, 40, 2]])
    padded = torch.tensor([[0, 50, 40, 2, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        # Causal attention: padding after the end cannot change the features ...
        torch.testing.assert_close(model.encode_text(padded), model.encode_text(caption))
        # ... and they are not the features of any other position.
        shorter = model.encode_text(caption[:, :3])
        assert not torch.allclose(model.encode_text(caption), shorter)


def test_activation_is_selectable():
    x = torch.linspace(-4, 4, 101)
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    assert (QuickGELU()(x) - F.gelu(x)).abs().max() < 0.03  # an approximation, not the same function

    torch.manual_seed(0)
    quick = build_model(dataclasses.replace(TINY_VIT, activation="quick_gelu")).eval()
    exact = build_model(dataclasses.replace(TINY_VIT, activation="gelu")).eval()
    exact.load_state_dict(quick.state_dict())
    assert isinstance(quick.visual.transformer.resblocks[0].mlp.act, QuickGELU)
    assert isinstance(exact.transformer.resblocks[0].mlp.act, torch.nn.GELU)
    with torch.no_grad():
        a, b = quick(images_for(TINY_VIT), tokens_for(TINY_VIT)), exact(images_for(TINY_VIT), tokens_for(TINY_VIT))
    assert not torch.allclose(a.image_features, b.image_features)
    assert not torch.allclose(a.text_features, b.text_features)


def test_initialisation_follows_openai():
    config = ModelConfig(embed_dim=256, text=TextConfig(context_length=77, vocab_size=4096, width=512, layers=8),
                         vision=VisionConfig(image_size=64, patch_size=8, width=512, layers=4))
    torch.manual_seed(0)
    model = build_model(config)
    block = model.transformer.resblocks[3]

    def std(t: torch.Tensor) -> float:
        return t.detach().std().item()

    assert std(model.token_embedding.weight) == pytest.approx(0.02, rel=0.02)
    assert std(model.positional_embedding) == pytest.approx(0.01, rel=0.02)
    assert std(model.text_projection) == pytest.approx(512 ** -0.5, rel=0.02)
    assert std(block.attn.in_proj_weight) == pytest.approx(512 ** -0.5, rel=0.02)
    assert std(block.attn.out_proj.weight) == pytest.approx(512 ** -0.5 * 16 ** -0.5, rel=0.02)
    assert std(block.mlp.c_fc.weight) == pytest.approx(1024 ** -0.5, rel=0.02)
    assert std(block.mlp.c_proj.weight) == pytest.approx(512 ** -0.5 * 16 ** -0.5, rel=0.02)
    assert block.mlp.c_proj.bias.abs().max() == 0 and block.attn.in_proj_bias.abs().max() == 0
    vision_block = model.visual.transformer.resblocks[0]
    assert std(vision_block.attn.out_proj.weight) == pytest.approx(512 ** -0.5 * 8 ** -0.5, rel=0.02)
    assert std(model.visual.proj) == pytest.approx(512 ** -0.5, rel=0.05)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_clamp_logit_scale_keeps_the_temperature_in_range():
    model = build_model(TINY_VIT)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_logit_scale(torch.compile(model))  # reaches through wrappers (DDP's .module, compile's ._orig_mod)
    assert model.logit_scale.item() == 0.0
    assert model.logit_scale.requires_grad


def test_bf16_autocast_is_close_to_fp32():
    for config in (TINY_VIT, TINY_RESNET):
        torch.manual_seed(0)
        model = build_model(config).eval()
        images, tokens = images_for(config), tokens_for(config)
        with torch.no_grad():
            full = model(images, tokens)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = model(images, tokens)
        assert half.image_features.dtype == torch.bfloat16
        for a, b in ((full.image_features, half.image_features), (full.text_features, half.text_features)):
            assert torch.isfinite(b).all()
            assert F.cosine_similarity(a, b.float(), dim=-1).min() > 0.99


def test_bf16_residual_stream_stays_bf16_and_norms_keep_float32_weights():
    """Under autocast no block's output is float32 (a float32 stream doubles the bytes every add and norm
    moves). CUDA autocast runs layer_norm in float32, so there the norms must cast back; CPU autocast
    leaves layer_norm alone, so on CPU this catches the text tower's float32 embeddings."""
    model = build_model(TINY_VIT)
    block_dtypes = []
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        block.register_forward_hook(lambda module, inputs, output: block_dtypes.append(output.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images_for(TINY_VIT), tokens_for(TINY_VIT))
    assert block_dtypes == [torch.bfloat16] * (2 * TINY_VIT.vision.layers)
    (out.image_features.float().sum() + out.text_features.float().sum()).backward()
    assert model.visual.ln_pre.weight.dtype == torch.float32 and model.visual.ln_pre.weight.grad is not None
    with torch.no_grad():
        full = model(images_for(TINY_VIT), tokens_for(TINY_VIT))
    assert {full.image_features.dtype, full.text_features.dtype} == {torch.float32}


def gradients(model: CLIP, images: torch.Tensor, tokens: torch.Tensor) -> tuple[ClipOutput, dict]:
    model.zero_grad()
    out = model(images, tokens)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    loss = F.cross_entropy(logits, torch.arange(len(logits))) + F.cross_entropy(logits.T, torch.arange(len(logits)))
    loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config", [TINY_VIT, TINY_RESNET], ids=["vit", "resnet"])
def test_grad_checkpointing_changes_nothing(config):
    torch.manual_seed(0)
    plain = build_model(config).train()
    checkpointed = build_model(dataclasses.replace(config, grad_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    visual = checkpointed.visual
    assert checkpointed.transformer.grad_checkpointing
    assert (visual.grad_checkpointing if config.vision.arch == "resnet" else visual.transformer.grad_checkpointing)

    images, tokens = images_for(config), tokens_for(config)
    out_plain, grads_plain = gradients(plain, images, tokens)
    out_ckpt, grads_ckpt = gradients(checkpointed, images, tokens)
    torch.testing.assert_close(out_ckpt, out_plain)
    assert grads_ckpt.keys() == grads_plain.keys() and len(grads_plain) == len(list(plain.parameters()))
    torch.testing.assert_close(grads_ckpt, grads_plain)
    torch.testing.assert_close(checkpointed.state_dict(), plain.state_dict())  # BatchNorm stats counted once

    checkpointed.set_grad_checkpointing(False)
    assert not checkpointed.transformer.grad_checkpointing


def test_patch_dropout_drops_tokens_only_in_training():
    config = dataclasses.replace(TINY_VIT, vision=dataclasses.replace(TINY_VIT.vision, patch_dropout=0.5))
    torch.manual_seed(0)
    dropping = build_model(config)
    reference = build_model(TINY_VIT)
    reference.load_state_dict(dropping.state_dict())
    seen = []
    dropping.visual.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    images, tokens = images_for(config), tokens_for(config)

    dropping.train()
    reference.train()
    with torch.no_grad():
        trained = dropping.encode_image(images)
        assert seen == [1 + 16 // 2]  # class token + half of the 4x4 patches
        assert not torch.allclose(trained, reference.encode_image(images))

        dropping.eval()
        reference.eval()
        torch.testing.assert_close(dropping(images, tokens), reference(images, tokens), rtol=0, atol=0)
        assert seen[-1] == 17


def test_patch_dropout_keeps_the_class_token():
    config = dataclasses.replace(TINY_VIT.vision, patch_dropout=0.9)
    vit = VisionTransformer(config, embed_dim=8, activation="gelu").train()
    kept = vit.patch_keep_indices(2, "cpu")
    assert kept.shape == (2, 1)  # at least one of the 16 patches survives
    assert set(kept.flatten().tolist()) <= set(range(16))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_towers_compile_without_graph_breaks(train):
    """fullgraph=True raises on any graph break; the eager backend keeps the test cheap."""
    torch.manual_seed(0)
    vision = dataclasses.replace(TINY_VIT.vision, patch_dropout=0.25)
    vit = VisionTransformer(vision, embed_dim=24, activation="quick_gelu").train(train)
    text = TextTransformer(TEXT, embed_dim=24, activation="gelu").train(train)
    images, tokens = images_for(TINY_VIT), tokens_for(TINY_VIT)
    compiled_vit = torch.compile(vit, fullgraph=True, backend="eager")
    compiled_text = torch.compile(text, fullgraph=True, backend="eager")
    if train:
        vit.set_grad_checkpointing(True)
        text.transformer.grad_checkpointing = True
        compiled_vit(images).sum().backward()
        compiled_text(tokens).sum().backward()
        assert vit.conv1.weight.grad is not None and text.token_embedding.weight.grad is not None
    else:
        with torch.no_grad():
            torch.testing.assert_close(compiled_vit(images), vit(images))
            torch.testing.assert_close(compiled_text(tokens), text(tokens))
    torch._dynamo.reset()
