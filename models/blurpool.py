"""BlurPool: a binomial low-pass filter before each downsampling, so that strided layers alias less (Zhang 2019,
"Making convolutional networks shift-invariant again", https://arxiv.org/abs/1904.11486).

Two variants, each as a public ImageNet recipe does it (``model.net.blurpool``):

- ``ffcv``: libffcv/ffcv-imagenet, train_imagenet.py (``BlurPoolConv2d``, ``apply_blurpool``): every ``nn.Conv2d``
  with a stride > 1 and >= 16 input channels first blurs its input (the 3x3 filter [1 2 1]^T [1 2 1] / 16 per
  channel, stride 1, padding 1), then convolves as before.
- ``composer``: mosaicml/composer, composer/algorithms/blurpool (``apply_blurpool`` with its defaults
  replace_convs, replace_maxpools, blur_first): the same convolutions, and every ``nn.MaxPool2d`` with a stride > 1
  becomes the max over the same windows at stride 1, then the blur at the pool's stride (MaxBlurPool).

The parameters are unchanged (the filters are buffers), the state_dict keys are not, on purpose: a wrapped conv's
weight moves to ``<name>.conv.weight`` beside ``<name>.blur_filter``, and a blurred max-pool holds a
``blur_filter``, so torchvision's strict ``load_state_dict`` refuses such weights instead of loading them into a
network without the blurs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("ffcv", "composer")
MIN_CHANNELS = 16  # both recipes leave the stem (3 input channels) alone


def binomial_filter(channels: int) -> torch.Tensor:
    """The 3x3 binomial blur as depthwise conv2d weights, ``(channels, 1, 3, 3)``; each filter sums to 1."""
    taps = torch.tensor([1.0, 2.0, 1.0])
    return (torch.outer(taps, taps) / 16).expand(channels, 1, 3, 3).contiguous()


def blur(x: torch.Tensor, blur_filter: torch.Tensor, stride: int | tuple[int, int] = 1) -> torch.Tensor:
    """Each channel of ``x`` blurred on its own, zero-padded to keep the size at stride 1; the filter takes the
    input's dtype (bf16 or fp16 activations, whether by autocast or by a cast network)."""
    return F.conv2d(x, blur_filter.to(x.dtype), stride=stride, padding=1, groups=blur_filter.shape[0])


class BlurPoolConv2d(nn.Module):
    """FFCV's ``BlurPoolConv2d``: the blur, then the original (strided) convolution, kept as ``.conv``."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("blur_filter", binomial_filter(conv.in_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(blur(x, self.blur_filter))


class MaxBlurPool2d(nn.Module):
    """Composer's ``BlurMaxPool2d``: the max-pool at stride 1, then the blur at the pool's stride; the output size is
    the pool's. Its one filter serves any number of channels (a view per call)."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(
            pool.kernel_size, stride=1, padding=pool.padding, dilation=pool.dilation, ceil_mode=pool.ceil_mode
        )
        self.stride = pool.stride
        self.register_buffer("blur_filter", binomial_filter(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur(self.pool(x), self.blur_filter.expand(x.shape[1], -1, -1, -1), stride=self.stride)


def _largest(stride: int | tuple[int, ...]) -> int:
    return max(stride) if isinstance(stride, tuple) else stride


def _blurred(module: nn.Module, variant: str) -> nn.Module | None:
    """``module``'s BlurPool replacement under ``variant``, or None where the variant leaves it alone."""
    if isinstance(module, nn.Conv2d) and max(module.stride) > 1 and module.in_channels >= MIN_CHANNELS:
        return BlurPoolConv2d(module)
    if variant == "composer" and isinstance(module, nn.MaxPool2d) and _largest(module.stride) > 1:
        return MaxBlurPool2d(module)
    return None


def apply_blurpool(net: nn.Module, variant: str) -> nn.Module:
    """``net`` with BlurPool (``variant``: ffcv or composer, see the module docstring), changed in place and returned.
    A variant that would change nothing in ``net`` is refused: training it would silently be the plain network."""
    if variant not in VARIANTS:
        raise ValueError(f"model.net.blurpool={variant} is not a BlurPool variant; choose null, ffcv or composer")
    replacements = {name: _blurred(module, variant) for name, module in net.named_modules()}
    replacements = {name: module for name, module in replacements.items() if module is not None}
    if not replacements:
        convs = "no strided convolution with >= 16 input channels"
        if variant == "ffcv":
            raise ValueError(
                f"model.net.blurpool=ffcv changes nothing in {type(net).__name__}: it has {convs} "
                "(model.net.blurpool=composer also blurs the strided max-pools)"
            )
        raise ValueError(
            f"model.net.blurpool=composer changes nothing in {type(net).__name__}: it has {convs} nor strided max-pool"
        )
    for name, module in replacements.items():
        net.set_submodule(name, module)
    return net
