"""The torchvision backend's train loader: per-rank shards that cover the set, a fresh permutation each epoch, and
augmentations seeded by (seed, epoch, index)."""

from __future__ import annotations

from pathlib import Path

import torch

from data.ilsvrc import Split, load_layout
from data.placement import Placement, Shard
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
