"""Loaders built as the datamodule builds them, for tests of one loader on its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from data.dali import DaliLoaders
from data.ilsvrc import Split
from data.placement import BatchRequest, Placement, Shard
from data.spec import ImageSpec
from data.torchvision_backend import TorchvisionLoaders

NODES = {"dali": DaliLoaders, "torchvision": TorchvisionLoaders}


def small_spec(size: int = 32, resize: int | None = None, scale: Sequence[float] = (0.35, 1.0)) -> ImageSpec:
    return ImageSpec(image_size=size, val_resize_size=resize or size, train_crop_scale=tuple(scale))


def loader(
    kind: str,
    split: Split,
    *,
    train: bool,
    batch_size: int,
    spec: ImageSpec,
    shard: Shard | None = None,
    placement: Placement | None = None,
    seed: int = 0,
    ten_crop: bool = False,
    **options,
) -> Iterable:
    """``kind``'s train or val loader of ``split``, rank 0 of 1 and one thread unless told otherwise; ``options``:
    the loader node's own (DALI's device, ...)."""
    node = NODES[kind](**options)
    request = BatchRequest(split, spec, batch_size, shard or Shard(), placement or Placement(workers=1))
    return node.train(request, seed=seed, trained_batches=lambda: 0) if train else node.val(request, ten_crop=ten_crop)


def unnormalised(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Pixels on the 0..255 scale again, from a normalised (N, 3, H, W) batch."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    return images * std + mean
