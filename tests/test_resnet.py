"""CLIP's modified ResNet tower: structure, OpenCLIP equivalence, init, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clip_ray.config import ConfigError, VisionConfig
from clip_ray.model.resnet import Bottleneck, ModifiedResNet

TINY = VisionConfig(arch="resnet", image_size=64, width=16, resnet_layers=(1, 2, 1, 1), head_width=32)
RN50 = VisionConfig(arch="resnet", image_size=224, width=64, resnet_layers=(3, 4, 6, 3))
RN50X4 = VisionConfig(arch="resnet", image_size=288, width=80, resnet_layers=(4, 6, 10, 6))


def open_clip_resnet(config: VisionConfig, embed_dim: int, device: str = "cpu") -> nn.Module:
    """OpenCLIP's tower (the reference), imported outside any device context."""
    modified_resnet = pytest.importorskip("open_clip.modified_resnet")
    heads = config.width * 32 // config.head_width
    with torch.device(device):
        return modified_resnet.ModifiedResNet(list(config.resnet_layers), embed_dim, heads,
                                              config.image_size, config.width)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_batch_norms(model: nn.Module) -> None:
    """Fresh BatchNorms are the identity and zeroed bn3 silences every residual branch;
    random statistics make every path count in an equivalence test."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_()
                module.bias.normal_(std=0.1)
                module.running_mean.normal_(std=0.1)
                module.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("config, embed_dim", [(TINY, 24), (RN50, 1024), (RN50X4, 640)], ids=["tiny", "RN50", "RN50x4"])
def test_state_dict_names_and_shapes_match_open_clip(config, embed_dim):
    theirs = open_clip_resnet(config, embed_dim, device="meta")
    with torch.device("meta"):
        ours = ModifiedResNet(config, embed_dim)
    our_shapes = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    their_shapes = {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    assert our_shapes == their_shapes
    assert n_params(ours) == n_params(theirs)


def test_parameter_counts_of_released_configurations():
    with torch.device("meta"):
        assert n_params(ModifiedResNet(RN50, 1024)) == 38_316_896
        assert n_params(ModifiedResNet(RN50X4, 640)) == 87_137_080


def test_open_clip_weights_load_strictly_and_give_the_same_features():
    torch.manual_seed(0)
    theirs = open_clip_resnet(TINY, 24)
    randomise_batch_norms(theirs)
    ours = ModifiedResNet(TINY, 24)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(3, 3, 64, 64)
    for train in (False, True):
        ours.train(train)
        theirs.train(train)
        with torch.no_grad():
            expected = theirs(images)
            got = ours(images)
        assert got.shape == (3, 24)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_features_depend_on_each_image_alone():
    torch.manual_seed(0)
    model = ModifiedResNet(TINY, 24).eval()
    randomise_batch_norms(model)
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        batched = model(images)
        single = model(images[2:3])
    assert batched.shape == (4, 24)
    torch.testing.assert_close(batched[2:3], single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])


def test_positional_embedding_follows_image_size():
    config = VisionConfig(arch="resnet", image_size=96, width=8, resnet_layers=(1, 1, 1, 1), head_width=32)
    model = ModifiedResNet(config, 16).eval()
    assert model.attnpool.positional_embedding.shape == ((96 // 32) ** 2 + 1, 8 * 32)
    assert model.attnpool.heads == 8 * 32 // 32
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 16)
        with pytest.raises(ValueError, match="image size"):
            model(torch.randn(2, 3, 64, 64))


def test_rejects_impossible_configs():
    with pytest.raises(ConfigError, match="multiple of 32"):
        ModifiedResNet(VisionConfig(arch="resnet", image_size=100, width=8, resnet_layers=(1, 1, 1, 1)), 16)
    with pytest.raises(ConfigError, match="arch"):
        ModifiedResNet(VisionConfig(arch="vit", image_size=64, width=64), 16)


def test_only_the_stem_convolution_is_strided():
    """Anti-aliasing: downsampling after the stem happens in average pools, never in a strided conv."""
    model = ModifiedResNet(TINY, 24)
    strided = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == ["conv1"]
    for stage, stride in [(model.layer1, None), (model.layer2, 2), (model.layer3, 2), (model.layer4, 2)]:
        first = stage[0]
        pool = first.pool
        assert (isinstance(pool, nn.AvgPool2d) and pool.kernel_size == stride) or (stride is None and isinstance(pool, nn.Identity))
        assert isinstance(first.downsample[0], nn.AvgPool2d)


def test_initialisation():
    torch.manual_seed(0)
    model = ModifiedResNet(TINY, 24)
    for block in model.blocks():
        assert torch.all(block.bn3.weight == 0)
    expected_std = (TINY.width * 32) ** -0.5
    pool = model.attnpool
    for weight in (pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight, pool.c_proj.weight,
                   pool.positional_embedding):
        assert weight.std().item() == pytest.approx(expected_std, rel=0.05)
        assert weight.mean().abs().item() < 0.1 * expected_std


def test_fresh_block_starts_as_the_identity():
    """Zeroed bn3 silences the residual branch, so a width-preserving block is just ReLU(x)."""
    torch.manual_seed(0)
    model = ModifiedResNet(TINY, 24).train()
    block = model.layer2[1]
    assert block.downsample is None
    x = torch.randn(2, block.conv1.in_channels, 4, 4)
    torch.testing.assert_close(block(x), torch.relu(x))


def _train_step(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    features = model(images)
    (features ** 2).sum().backward()
    return features.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_grad_checkpointing_changes_nothing_but_memory():
    torch.manual_seed(0)
    plain = ModifiedResNet(TINY, 24).train()
    randomise_batch_norms(plain)
    checkpointed = ModifiedResNet(TINY, 24).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)

    calls = []
    for block in checkpointed.blocks():
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    buffer_addresses = [b.data_ptr() for b in checkpointed.buffers()]
    images = torch.randn(4, 3, 64, 64)
    want_features, want_grads = _train_step(plain, images)
    got_features, got_grads = _train_step(checkpointed, images)

    # Each block ran once forward and once more while backward recomputed it.
    assert len(calls) == 2 * len(checkpointed.blocks())
    torch.testing.assert_close(got_features, want_features, rtol=0, atol=0)
    assert want_grads.keys() == got_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # The recomputation must not count the batch a second time in the running statistics.
    for (name, want), got in zip(plain.named_buffers(), checkpointed.buffers()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
    # ... and the module keeps its own buffer tensors (DDP and EMA copies hold references to them).
    assert [b.data_ptr() for b in checkpointed.buffers()] == buffer_addresses

    checkpointed.set_grad_checkpointing(False)
    calls.clear()
    _train_step(checkpointed, images)
    assert len(calls) == len(checkpointed.blocks())


def test_bottleneck_shapes():
    block = Bottleneck(32, 16, stride=2)
    out = block(torch.randn(2, 32, 8, 8))
    assert out.shape == (2, 64, 4, 4)
    assert torch.all(out >= 0)


def test_checkpointed_resnet_compiles_without_graph_breaks():
    """Under torch.compile the BatchNorm-preserving recompute context is bypassed; training still works."""
    config = VisionConfig(arch="resnet", image_size=64, width=8, resnet_layers=(1, 1, 1, 1), head_width=8)
    model = ModifiedResNet(config, embed_dim=16).train()
    model.set_grad_checkpointing(True)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    images = torch.randn(2, 3, 64, 64)
    compiled(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
