"""Network architectures by name, built by torchvision's own builders (randomly initialised)."""

from __future__ import annotations

import torchvision
from torch import nn

from models.blurpool import apply_blurpool
from models.export import load_weights_only

ARCHITECTURES = (
    "alexnet",
    *(f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn")),
    *(f"resnet{depth}" for depth in (18, 34, 50, 101, 152)),
)


def build_net(
    arch: str,
    num_classes: int,
    zero_init_residual: bool = False,
    weights: str | None = None,
    blurpool: str | None = None,
) -> nn.Module:
    """``arch`` from ``ARCHITECTURES``; ``zero_init_residual`` zeroes the last BN of each residual branch (ResNets);
    ``blurpool``: null, ffcv or composer (models/blurpool.py), applied before the weights load, so that the weights
    exported from a BlurPool run load back; ``weights``: a state_dict file (``python -m models.export``) of this
    architecture and blurpool, loaded strictly, weights only."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    options = {"weights": None, "num_classes": num_classes}
    if arch.startswith("resnet"):
        options["zero_init_residual"] = zero_init_residual
    elif zero_init_residual:
        raise ValueError(f"zero_init_residual applies to ResNets only, not to {arch!r}")
    net = torchvision.models.get_model(arch, **options)
    if blurpool is not None:
        apply_blurpool(net, blurpool)
    if weights is not None:
        net.load_state_dict(load_weights_only(weights), strict=True)
    return net
