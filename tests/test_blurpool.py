"""BlurPool (models/blurpool.py): which layers each variant blurs, what the blur computes, and that such a network is
never mistaken for torchvision's."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from models.blurpool import BlurPoolConv2d, MaxBlurPool2d, apply_blurpool, binomial_filter, blur
from models.zoo import build_net
from tests.conftest import SMALL_RUN, build_module

VALID = [("resnet18", "ffcv"), ("resnet18", "composer"), ("resnet50", "ffcv"), ("resnet50", "composer")]
VALID += [("vgg11", "composer")]
IMAGES = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def n_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def blurred_names(net: nn.Module) -> dict[str, str]:
    return {name: type(m).__name__ for name, m in net.named_modules() if isinstance(m, BlurPoolConv2d | MaxBlurPool2d)}


@pytest.mark.parametrize(("arch", "variant"), VALID)
def test_parameters_are_unchanged_and_the_output_shape_too(arch: str, variant: str):
    plain, blurred = build_net(arch, 10), build_net(arch, 10, blurpool=variant)
    assert blurred_names(blurred) and not blurred_names(plain)
    assert n_parameters(blurred) == n_parameters(plain)
    with torch.no_grad():
        assert blurred.eval()(IMAGES).shape == plain.eval()(IMAGES).shape == (2, 10)


def test_ffcv_blurs_exactly_the_strided_convolutions_of_16_or_more_input_channels():
    """ResNet-18's strided 3x3 convs and 1x1 downsamples of layers 2-4, not the stem (3 input channels)."""
    net = build_net("resnet18", 10, blurpool="ffcv")
    strided = {f"layer{i}.0.{conv}": "BlurPoolConv2d" for i in (2, 3, 4) for conv in ("conv1", "downsample.0")}
    assert blurred_names(net) == strided
    assert isinstance(net.conv1, nn.Conv2d) and isinstance(net.maxpool, nn.MaxPool2d)
    assert blurred_names(build_net("resnet18", 10, blurpool="composer")) == {**strided, "maxpool": "MaxBlurPool2d"}
    # ResNet-50 (v1.5) strides in the bottleneck's 3x3 conv2: FFCV's example key
    assert "layer2.0.conv2.conv.weight" in build_net("resnet50", 10, blurpool="ffcv").state_dict()


def test_the_blur_keeps_a_constant_image_constant_away_from_the_borders():
    assert torch.allclose(binomial_filter(5).sum(dim=(1, 2, 3)), torch.ones(5))
    assert torch.equal(binomial_filter(1)[0, 0], torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16)
    constant = torch.full((1, 16, 8, 8), 3.0)
    blurred = blur(constant, binomial_filter(16))
    assert blurred.shape == constant.shape
    assert torch.allclose(blurred[..., 1:-1, 1:-1], constant[..., 1:-1, 1:-1])
    assert torch.allclose(blurred[..., 0, 0], torch.full((1, 16), 3.0 * 9 / 16))  # a corner: 9/16 of the filter inside


POOLS = {
    "resnet": nn.MaxPool2d(3, stride=2, padding=1),
    "vgg": nn.MaxPool2d(2, stride=2),
    "alexnet": nn.MaxPool2d(3, 2),
}


@pytest.mark.parametrize("size", [7, 8, 55, 56])
@pytest.mark.parametrize("pool", POOLS.values(), ids=POOLS.keys())
def test_max_blur_pool_has_the_output_size_of_its_max_pool(pool: nn.MaxPool2d, size: int):
    images = torch.randn(2, 16, size, size)
    assert MaxBlurPool2d(pool)(images).shape == pool(images).shape


def test_blurred_convolution_is_the_convolution_of_the_blurred_input():
    conv = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    images = torch.randn(2, 16, 9, 9)
    manual = nn.functional.conv2d(images, binomial_filter(16), padding=1, groups=16)
    assert torch.allclose(BlurPoolConv2d(conv)(images), conv(manual), atol=1e-6)


@pytest.mark.parametrize(("arch", "variant"), [("vgg11", "ffcv"), ("alexnet", "ffcv"), ("alexnet", "nearest")])
def test_a_variant_that_changes_nothing_or_is_unknown_is_refused(arch: str, variant: str):
    message = "model.net.blurpool=composer also blurs" if variant == "ffcv" else "choose null, ffcv or composer"
    with pytest.raises(ValueError, match=f"model.net.blurpool={variant}.*{message}"):
        build_net(arch, 10, blurpool=variant)


def test_channels_last_and_bf16_give_the_same_blur():
    net = build_net("resnet18", 10, blurpool="composer").eval()
    with torch.no_grad():
        reference = net(IMAGES)
        net.to(memory_format=torch.channels_last)
        assert torch.allclose(net(IMAGES.contiguous(memory_format=torch.channels_last)), reference, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = net(IMAGES.contiguous(memory_format=torch.channels_last))
        assert autocast.dtype == torch.bfloat16 and torch.allclose(autocast.float(), reference, atol=0.1, rtol=0.1)
    # bf16 activations meet the fp32 filter without autocast: the filter takes their dtype
    features = torch.randn(2, 16, 8, 8).bfloat16()
    assert blur(features, binomial_filter(16)).dtype == torch.bfloat16


def test_blur_modules_compile_into_one_graph():
    """No graph break (``fullgraph``): nothing in Python per step beyond the convolutions."""
    conv = torch.compile(BlurPoolConv2d(nn.Conv2d(16, 8, 3, stride=2, padding=1)), fullgraph=True, backend="eager")
    pool = torch.compile(MaxBlurPool2d(nn.MaxPool2d(3, stride=2, padding=1)), fullgraph=True, backend="eager")
    images = torch.randn(2, 16, 16, 16)
    assert conv(images).shape == (2, 8, 8, 8) and pool(images).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("variant", ["ffcv", "composer"])
def test_a_blurpool_state_dict_is_refused_by_torchvision(variant: str):
    state = build_net("resnet18", 10, blurpool=variant).state_dict()
    assert "layer2.0.conv1.blur_filter" in state and ("maxpool.blur_filter" in state) == (variant == "composer")
    with pytest.raises(RuntimeError, match="layer2.0.conv1.conv.weight"):
        torchvision.models.resnet18(num_classes=10).load_state_dict(state, strict=True)


def test_apply_blurpool_works_in_place_on_any_module():
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Sequential(nn.Conv2d(16, 16, 3, stride=(1, 2))))
    assert apply_blurpool(net, "ffcv") is net
    assert isinstance(net[0], nn.Conv2d) and isinstance(net[1][0], BlurPoolConv2d)


def test_the_config_key_reaches_the_network_and_the_card(make_cfg):
    module = build_module(make_cfg(*SMALL_RUN, "model.net.blurpool=ffcv").model, ["a", "b"])
    assert module.card.architecture["blurpool"] == "ffcv"
    assert "layer2.0.conv1" in blurred_names(module.net)
