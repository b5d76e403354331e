"""The torchvision DataLoader backend: libjpeg-turbo decoding and transforms.v2 on uint8 tensors in worker processes.

Batches stay uint8 until they are on the device (4x less to copy); the datamodule normalises them there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence

import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from data.ilsvrc import Split


def train_transform(image_size: int, crop_scale: Sequence[float]) -> v2.Transform:
    """Inception-style augmentation: random-resized crop (aspect 3/4..4/3) and a horizontal flip."""
    return v2.Compose(
        [v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True), v2.RandomHorizontalFlip()]
    )


def val_transform(image_size: int, resize_size: int, ten_crop: bool = False) -> v2.Transform:
    """The standard single-crop protocol: shorter side to ``resize_size``, then a centre crop; or the ten-crop one
    (Krizhevsky et al. 2012): the four corners and the centre, and their mirror images, stacked as (10, C, H, W)."""
    if ten_crop:
        return v2.Compose([v2.Resize(resize_size, antialias=True), v2.TenCrop(image_size), _stack])
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)])


def _stack(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(crops))


class ImageFiles(Dataset):
    """Decoded RGB uint8 images of a split. Keys are indices, or (index, seed) pairs from ``EpochSeededSampler``."""

    def __init__(self, split: Split, transform: v2.Transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.split.paths[index]
        try:
            image = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise RuntimeError(f"{path}: cannot be decoded ({error})") from error
        if seed is None:
            return self.transform(image), self.split.labels[index]
        with torch.random.fork_rng(devices=[]):  # the sample's augmentation depends on (seed, epoch, index) only
            torch.default_generator.manual_seed(seed)  # the CPU's: torch.manual_seed also seeds every accelerator
            return self.transform(image), self.split.labels[index]


class EpochSeededSampler(DistributedSampler):
    """DistributedSampler whose keys carry a per-sample augmentation seed derived from (seed, epoch, index).

    Augmentations then do not depend on worker count or on the process's RNG, so a resumed run sees exactly the
    crops and flips an uninterrupted one does.
    """

    skip = 0  # samples of the next epoch already trained (a run resumed in mid-epoch); read once

    def __iter__(self) -> Iterator[tuple[int, int]]:
        skip, self.skip = self.skip, 0
        for index in itertools.islice(super().__iter__(), skip, None):
            yield index, hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF


class ResumableDataLoader(DataLoader):
    """A train DataLoader that resumes in mid-epoch: Lightning restores a loader that has ``load_state_dict`` after
    the fit loop's progress, so the sampler can start the epoch after the batches already trained (the order is a
    function of (seed, epoch), so nothing else needs saving)."""

    def __init__(self, *args, trained_batches: Callable[[], int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.skip = self.trained_batches() * self.batch_size


def train_loader(
    split: Split,
    batch_size: int,
    image_size: int,
    crop_scale: Sequence[float],
    num_workers: int,
    rank: int,
    world_size: int,
    seed: int,
    pin_memory: bool,
    trained_batches: Callable[[], int],
) -> DataLoader:
    sampler = EpochSeededSampler(split, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return ResumableDataLoader(
        ImageFiles(split, train_transform(image_size, crop_scale)),
        trained_batches=trained_batches,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=num_workers > 0,
    )


def val_loader(
    split: Split,
    batch_size: int,
    image_size: int,
    resize_size: int,
    num_workers: int,
    rank: int,
    world_size: int,
    pin_memory: bool,
    ten_crop: bool = False,
) -> DataLoader:
    """Each image exactly once across ranks: no padding duplicates (ranks may differ by one batch)."""
    sampler = UnrepeatedDistributedSampler(split, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        ImageFiles(split, val_transform(image_size, resize_size, ten_crop)),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
