"""The torchvision backend's train loader: per-rank shards that cover the set, a fresh permutation each epoch, and
augmentations seeded by (seed, epoch, index)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data.ilsvrc import Split, load_layout
from data.placement import Placement, Shard
from data.resolution import FixedResolution
from data.torchvision_backend import RepeatedAugmentationSampler, TorchvisionLoaders
from tests.loaders import loader, small_spec


def test_two_shards_cover_the_set_with_a_fresh_permutation_each_epoch(small_demo_root: Path):
    paths = load_layout(small_demo_root).train.paths[:239]
    split = Split(paths, list(range(len(paths))))  # label = position: every sample can be told apart
    loaders = [
        loader(
            "torchvision",
            split,
            train=True,
            batch_size=8,
            spec=small_spec(16),
            shard=Shard(rank, 2),
            placement=Placement(),
        )
        for rank in (0, 1)
    ]
    epochs = []
    for epoch in range(3):
        for batches in loaders:
            batches.sampler.set_epoch(epoch)  # as Lightning's fit loop does
        shards = [[int(i) for _, labels in batches for i in labels] for batches in loaders]
        assert [len(shard) for shard in shards] == [120, 120]  # 239 padded to 240, 15 full batches per rank
        assert set(shards[0]) | set(shards[1]) == set(range(239))
        epochs.append(shards)
    for before, after in zip(epochs, epochs[1:]):
        for rank in (0, 1):
            shared = [len(set(after[rank]) & set(before[r])) for r in (0, 1)]
            assert all(20 < n < 100 for n in shared), shared  # a new random half, not a fixed split


def test_each_epoch_draws_new_augmentations_and_a_rerun_the_same(small_demo_root: Path):
    """A sample's crop and flip are a function of (seed, epoch, index): new in every epoch, the same in a rerun
    (which is what makes a resumed run see the samples of an uninterrupted one)."""
    paths = load_layout(small_demo_root).train.paths[:40]
    split = Split(paths, list(range(len(paths))))

    spec = small_spec(16, scale=(0.1, 1.0))

    def crops(epoch: int) -> dict[int, torch.Tensor]:
        batches = loader("torchvision", split, train=True, batch_size=8, spec=spec, placement=Placement())
        batches.sampler.set_epoch(epoch)
        return {int(label): image for images, labels in batches for image, label in zip(images, labels)}

    first, second, again = crops(0), crops(1), crops(0)
    assert first.keys() == second.keys() == set(range(40))
    assert all(torch.equal(first[i], again[i]) for i in first)
    assert sum(torch.equal(first[i], second[i]) for i in first) <= 2  # a crop can repeat by chance, rarely


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_repeated_augmentation_draws_each_image_repeats_times_with_its_own_seeds(world_size: int):
    """torchvision's RASampler: 1024 images, 4 repeats: every rank takes 1024 / world samples; the epoch holds 256
    distinct images, each exactly 4 times, spread over the ranks, each copy with its own augmentation seed."""
    resolution = FixedResolution(32)
    samplers = [
        RepeatedAugmentationSampler(range(1024), resolution, 4, num_replicas=world_size, rank=rank, seed=1)
        for rank in range(world_size)
    ]
    per_rank = [list(sampler) for sampler in samplers]
    keys = [key for keys in per_rank for key in keys]
    assert (
        [len(keys) for keys in per_rank] == [len(sampler) for sampler in samplers] == [1024 // world_size] * world_size
    )
    assert set(Counter(key.index for key in keys).values()) == {4} and len({key.index for key in keys}) == 256
    assert len({(key.index, key.seed) for key in keys}) == 1024
    if world_size == 4:  # each image's four copies on four ranks
        assert all(len({key.index for key in keys}) == 256 for keys in per_rank)
    samplers[0].set_epoch(1)
    assert [key.index for key in samplers[0]] != [key.index for key in per_rank[0]]
    loaders = TorchvisionLoaders(pin_memory=False, repeated_augmentations=4)
    assert loaders.batches_per_epoch(1024, 32, Shard(0, world_size)) == 1024 // world_size // 32
