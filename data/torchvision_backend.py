"""The torchvision loader (``data/loader=torchvision``): libjpeg-turbo decoding and transforms.v2 on uint8 tensors in
DataLoader worker processes, reading image files or a shard set's tars (data/shard_reader.py).

Batches stay uint8 until they are on the device (4x less to copy); the datamodule normalises them there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

from compat import UnrepeatedDistributedSampler
from data.augment import torchvision_augmentations
from data.ilsvrc import UNREADABLE_FILE_ADVICE, Split
from data.placement import BatchRequest, Placement, Shard
from data.resolution import FixedResolution, TrainResolution
from data.shard_set import ShardSplit
from data.spec import ConfigError, ImageSpec


def decode(path: str, spec: ImageSpec) -> torch.Tensor:
    """The file as 8-bit RGB (C, H, W), oriented as ``spec.orientation`` says: the one decoding step of the
    torchvision loader, ``predict.py`` and the index's full check."""
    return decode_bytes(read_file(path), spec)


def decode_bytes(encoded: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """An encoded image (1-D uint8: a file's bytes, or a shard sample's) as ``decode`` makes it."""
    image = decode_image(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=spec.orientation == "exif")
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = v2.functional.to_dtype(image, torch.uint8, scale=True)
    return image


def train_transform(spec: ImageSpec, size: int | None = None) -> v2.Transform:
    """Inception-style augmentation: random-resized crop to ``size`` (default: the spec's image size) and a horizontal
    flip, as the spec sizes them, then the spec's automatic augmentation and random erasing (data/augment.py)."""
    crop = v2.RandomResizedCrop(
        size or spec.image_size, scale=spec.train_crop_scale, ratio=spec.train_aspect_ratio, antialias=True
    )
    return v2.Compose([crop, v2.RandomHorizontalFlip(0.5 if spec.flip else 0.0), *torchvision_augmentations(spec)])


class TrainTransforms:
    """The train transform at each size a resolution schedule asks for, each built once per worker process."""

    def __init__(self, spec: ImageSpec) -> None:
        self.spec, self.by_size = spec, {}

    def at(self, size: int) -> v2.Transform:
        if size not in self.by_size:
            self.by_size[size] = train_transform(self.spec, size)
        return self.by_size[size]


def val_transform(spec: ImageSpec, ten_crop: bool = False) -> v2.Transform:
    """The standard single-crop protocol: shorter side to ``val_resize_size``, then a centre crop; or the ten-crop
    one (Krizhevsky et al. 2012): the four corners and the centre, and their mirror images, as (10, C, H, W)."""
    resize = v2.Resize(spec.val_resize_size, antialias=True)
    if ten_crop:
        return v2.Compose([resize, v2.TenCrop(spec.val_crop), _stack])
    return v2.Compose([resize, v2.CenterCrop(spec.val_crop)])


def _stack(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(crops))


class ImageFiles(Dataset):
    """Decoded RGB uint8 images of a split. Keys are indices (``transform`` a transform), or ``SampleKey``s from
    ``EpochSeededSampler`` (``transform`` the ``TrainTransforms`` of every size)."""

    def __init__(self, split: Split, spec: ImageSpec, transform: v2.Transform | TrainTransforms) -> None:
        self.split, self.spec, self.transform = split, spec, transform

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample ``index`` decoded, and its label (``ShardImages`` reads them from tar shards instead)."""
        path = self.split.paths[index]
        try:
            image = decode(path, self.spec)
        except RuntimeError as error:
            raise RuntimeError(f"{path}: cannot be decoded ({error})\n{UNREADABLE_FILE_ADVICE}") from error
        return image, self.split.labels[index]

    def __getitem__(self, key: int | SampleKey) -> tuple[torch.Tensor, int]:
        if not isinstance(key, SampleKey):
            image, label = self.load(key)
            return self.transform(image), label
        image, label = self.load(key.index)
        with torch.random.fork_rng(devices=[]):  # the sample's augmentation depends on its key only
            torch.default_generator.manual_seed(key.seed)  # the CPU's: torch.manual_seed also seeds every accelerator
            return self.transform.at(key.size)(image), label


def dataset_of(split: Split | ShardSplit, spec: ImageSpec, transform: v2.Transform) -> ImageFiles:
    """The dataset of a split of image files, or of a shard set's split (read from its tars)."""
    if isinstance(split, ShardSplit):
        from data.shard_reader import ShardImages  # which builds on this module's ImageFiles

        return ShardImages(split, spec, transform)
    return ImageFiles(split, spec, transform)


class SampleKey(NamedTuple):
    """A train sample as the sampler names it: which image, its augmentation seed, and the epoch's image size."""

    index: int
    seed: int
    size: int


class EpochSeededSampler(DistributedSampler):
    """DistributedSampler whose keys carry a per-sample augmentation seed derived from (seed, epoch, index) and the
    epoch's image size (``resolution``: Lightning's ``set_epoch`` names the epoch before each one starts).

    Augmentations then do not depend on worker count or on the process's RNG, so a resumed run sees exactly the
    crops, flips and sizes an uninterrupted one does.
    """

    skip = 0  # samples of the next epoch already trained (a run resumed in mid-epoch); read once

    def __init__(self, dataset: Dataset, resolution: TrainResolution, **options) -> None:
        super().__init__(dataset, **options)
        self.resolution = resolution

    def indices(self) -> Iterator[int]:
        """This rank's images of the epoch, in order."""
        return super().__iter__()

    def __iter__(self) -> Iterator[SampleKey]:
        skip, self.skip = self.skip, 0
        size = self.resolution.size(self.epoch)
        for position, index in itertools.islice(enumerate(self.indices()), skip, None):
            place = self.rank + position * self.num_replicas  # in the epoch's global order: a repeat is another draw
            yield SampleKey(index, hash((self.seed, self.epoch, index, place)) & 0x7FFF_FFFF, size)

    def __len__(self) -> int:
        return self.num_samples


class RepeatedAugmentationSampler(EpochSeededSampler):
    """Repeated augmentation (Hoffer et al. 2019; torchvision's ``RASampler`` of its classification reference, which
    follows DeiT's): each epoch draws ``1/repeats`` of the images, each ``repeats`` times with its own augmentation,
    the copies spread over the ranks; an epoch keeps about the split's length (``len // 256 * 256`` samples over
    all ranks, as torchvision's; a split of fewer than 256 images: all of it). Every rank takes ``num_samples``."""

    def __init__(self, dataset: Dataset, resolution: TrainResolution, repeats: int, **options) -> None:
        super().__init__(dataset, resolution, **options)
        self.repeats = repeats
        self.repeated_total = math.ceil(len(dataset) * repeats / self.num_replicas) * self.num_replicas
        self.num_samples = (len(dataset) // 256 * 256 or len(dataset)) // self.num_replicas
        self.total_size = self.num_samples * self.num_replicas

    def indices(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).repeat_interleave(self.repeats).tolist()
        order += order[: self.repeated_total - len(order)]
        return iter(order[self.rank : self.repeated_total : self.num_replicas][: self.num_samples])


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


class TorchvisionLoaders:
    """The loader node ``conf/data/loader/torchvision.yaml``; ``pin_memory`` speeds the copy to a GPU;
    ``repeated_augmentations``: 1, or the copies of each drawn image per epoch (``RepeatedAugmentationSampler``)."""

    name = "torchvision"
    ten_crop = True  # supports data.val_crops=10

    def __init__(self, pin_memory: bool = True, repeated_augmentations: int = 1) -> None:
        if (
            not isinstance(repeated_augmentations, int)
            or isinstance(repeated_augmentations, bool)
            or (repeated_augmentations < 1)
        ):
            raise ConfigError(
                "data.loader.repeated_augmentations", repeated_augmentations, "1 (none), or copies per image >= 2"
            )
        self.pin_memory, self.repeated_augmentations = pin_memory, repeated_augmentations

    def batches_per_epoch(self, num_images: int, batch_size: int, shard: Shard) -> int:
        """Full batches per rank (the sampler pads the split to a multiple of the world size, or draws the repeated
        augmentation's share; the last partial batch is dropped)."""
        sampler = self._sampler(range(num_images), shard, FixedResolution(1), seed=0)
        return len(sampler) // batch_size

    @staticmethod
    def val_order(num_images: int, shard: Shard) -> range:
        """The split's images in the order this rank's val loader yields them: every world_size-th from its rank."""
        return range(shard.rank, num_images, shard.world_size)

    @staticmethod
    def where_decoded(placement: Placement) -> str:
        """Where this rank's JPEGs are decoded, for its first log lines."""
        return f"CPU (torchvision, {placement.workers} DataLoader worker(s))"

    def train(
        self,
        request: BatchRequest,
        seed: int,
        trained_batches: Callable[[], int] = lambda: 0,
        resolution: TrainResolution | None = None,
        current_epoch: Callable[[], int] = lambda: 0,
    ) -> DataLoader:
        """``resolution``: the image size of each epoch (default: the spec's); the sampler learns the epoch from
        Lightning's ``set_epoch`` (``current_epoch`` is for loaders without a sampler)."""
        resolution = resolution or FixedResolution(request.spec.image_size)
        sampler = self._sampler(request.split, request.shard, resolution, seed)
        dataset = dataset_of(request.split, request.spec, TrainTransforms(request.spec))
        return ResumableDataLoader(
            dataset, trained_batches=trained_batches, sampler=sampler, drop_last=True, **self._loading(request)
        )

    def _sampler(self, dataset: Sequence, shard: Shard, resolution: TrainResolution, seed: int) -> EpochSeededSampler:
        options = dict(num_replicas=shard.world_size, rank=shard.rank, shuffle=True, seed=seed)
        if self.repeated_augmentations > 1:
            return RepeatedAugmentationSampler(dataset, resolution, self.repeated_augmentations, **options)
        return EpochSeededSampler(dataset, resolution, **options)

    def val(self, request: BatchRequest, ten_crop: bool = False) -> DataLoader:
        """Each image exactly once across ranks: no padding duplicates (ranks may differ by one batch)."""
        shard = request.shard
        sampler = UnrepeatedDistributedSampler(
            request.split, num_replicas=shard.world_size, rank=shard.rank, shuffle=False
        )
        dataset = dataset_of(request.split, request.spec, val_transform(request.spec, ten_crop))
        return DataLoader(dataset, sampler=sampler, **self._loading(request))

    def _loading(self, request: BatchRequest) -> dict:
        placement = request.placement
        return dict(
            batch_size=request.batch_size,
            num_workers=placement.workers,
            persistent_workers=placement.workers > 0,
            pin_memory=self.pin_memory and placement.device.type == "cuda",
        )
