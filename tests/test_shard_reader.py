"""The torchvision loader over a shard set (data/shard_reader.py), on the real ILSVRC samples (val) and a demo image
per class (train) converted by ``python -m data.shards``: the images, labels and batches of the same files read from
folders, each tar opened once per worker, and damaged shards (copies of a converted set) named with the sample at
fault."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data import shard_reader
from data.ilsvrc import Split, load_layout
from data.placement import Placement
from data.shard_reader import ShardImages, ShardReader, descriptor_budget
from data.shard_set import MANIFEST, ShardSet, ShardSetError
from data.shards import sample_key
from data.torchvision_backend import val_transform
from tests.conftest import convert_to_shards, one_image_per_class
from tests.loaders import loader, small_spec


def source_files(shard_set: ShardSet, name: str) -> Split:
    """The files the converter read for split ``name``, in the shard set's own sample order (each sample's key mapped
    back to its file in the source folders the manifest names) with their labels there: what ``ImageFiles`` reads
    as the shards should be read."""
    layout = load_layout(shard_set.manifest["source"]["root"])
    assert shard_set.wnids == layout.wnids  # a label names the same class in both
    files = getattr(layout, name)
    by_key = {sample_key(path, name): (path, label) for path, label in zip(files.paths, files.labels)}
    keys = [sample.key for _, sample in getattr(shard_set, name).samples()]
    assert sorted(keys) == sorted(by_key)  # every file, each once
    return Split([by_key[key][0] for key in keys], [by_key[key][1] for key in keys])


@pytest.fixture(scope="module")
def every_sample(tmp_path_factory: pytest.TempPathFactory) -> ShardSet:
    """All 1000 real ILSVRC samples, one per class, converted by ``python -m data.shards``: val in 4 shards of 250
    (sorted by key: label i is sample i), train left out."""
    root = one_image_per_class(tmp_path_factory.mktemp("every-sample") / "imagenet", 1000)
    return ShardSet.open(convert_to_shards(root, root.parent / "shards", "--splits", "val", "--shard-samples", "250"))


@pytest.fixture(scope="module")
def unique_labels(unique_label_shards: Path) -> ShardSet:
    """240 demo images of 240 classes (conftest's converted set, shared): train in a seeded permutation over 5
    shards of 48, val in 5 shards of 48. Read only: a test that damages it works on a copy."""
    return ShardSet.open(unique_label_shards)


@pytest.fixture
def damageable(unique_labels: ShardSet, tmp_path: Path) -> ShardSet:
    """A copy of ``unique_labels`` in ``tmp_path``, for a test to damage."""
    return ShardSet.open(shutil.copytree(unique_labels.root, tmp_path / "shards"))


def test_val_batches_are_those_of_the_same_files(every_sample: ShardSet):
    spec = small_spec(48, resize=56)
    batches = [
        list(loader("torchvision", split, train=False, batch_size=100, spec=spec, placement=Placement(workers=2)))
        for split in (every_sample.val, source_files(every_sample, "val"))
    ]
    assert len(batches[0]) == len(batches[1]) == 10
    for (shard_images, shard_labels), (file_images, file_labels) in zip(*batches):
        assert shard_images.dtype == torch.uint8 and torch.equal(shard_images, file_images)
        assert torch.equal(shard_labels, file_labels)
    assert torch.cat([labels for _, labels in batches[0]]).tolist() == list(range(1000))


def test_train_batches_are_those_of_the_same_files_with_the_same_seed(unique_labels: ShardSet):
    """The order and the augmentations are a function of (seed, epoch, index): the same for shards as for files
    listed in the shards' order."""
    spec = small_spec(32, scale=(0.1, 1.0))
    loaders = [
        loader("torchvision", split, train=True, batch_size=16, spec=spec, seed=7, placement=Placement(workers=2))
        for split in (unique_labels.train, source_files(unique_labels, "train"))
    ]
    for epoch in (0, 1):
        for batches in loaders:
            batches.sampler.set_epoch(epoch)
        pairs = list(zip(*loaders))
        assert len(pairs) == 15  # 240 images, 16 a batch
        for (shard_images, shard_labels), (file_images, file_labels) in pairs:
            assert torch.equal(shard_images, file_images) and torch.equal(shard_labels, file_labels)


def test_ten_crops_over_shards(every_sample: ShardSet):
    spec = small_spec(24, resize=32)
    first = [
        next(iter(loader("torchvision", split, train=False, batch_size=8, spec=spec, ten_crop=True)))
        for split in (every_sample.val, source_files(every_sample, "val"))
    ]
    (shard_images, shard_labels), (file_images, file_labels) = first
    assert shard_images.shape == (8, 10, 3, 24, 24)
    assert torch.equal(shard_images, file_images) and shard_labels.tolist() == file_labels.tolist() == list(range(8))


def tar_descriptors() -> int:
    """Descriptors this process has open on .tar files (a real count, from /proc)."""
    fds = Path("/proc/self/fd")
    return sum(os.readlink(fds / fd).endswith(".tar") for fd in os.listdir(fds) if (fds / fd).is_symlink())


def test_each_worker_opens_each_shard_once_and_keeps_it(unique_labels: ShardSet, tmp_path: Path, monkeypatch):
    """Two workers over two epochs: every tar opened once per worker, none inherited from the parent (which read a
    sample before the workers were forked)."""
    shard_set = unique_labels
    log, real_open = tmp_path / "opens.log", os.open

    def logged_open(path, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {path}\n")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", logged_open)
    dataset = ShardImages(shard_set.train, small_spec(16), val_transform(small_spec(16)))
    dataset[0]  # the parent opens the first shard: workers must not share its descriptor
    batches = DataLoader(
        dataset,
        batch_size=10,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
        num_workers=2,
        persistent_workers=True,
    )
    labels = [label for _ in range(2) for _, batch in batches for label in batch.tolist()]
    assert sorted(labels) == sorted(list(range(240)) * 2)
    opens = Counter(tuple(line.split(" ", 1)) for line in log.read_text().splitlines() if line.endswith(".tar"))
    assert set(opens.values()) == {1}  # no tar opened twice by one process
    tars = {pid: {path for p, path in opens if p == pid} for pid, _ in opens}
    workers = [pid for pid in tars if pid != str(os.getpid())]
    assert tars[str(os.getpid())] == {shard_set.train.tar_paths[0]} and len(workers) == 2
    assert all(tars[pid] == set(shard_set.train.tar_paths) for pid in workers)  # 120 random samples each: all 5


def test_beyond_the_descriptor_budget_the_least_recently_used_tar_is_closed(unique_labels: ShardSet, monkeypatch):
    monkeypatch.setattr(shard_reader, "descriptor_budget", lambda tars: 2)
    reader = ShardReader.of_split(unique_labels.val)  # 5 shards of 48
    before = tar_descriptors()
    for index in (0, 48, 0, 96, 0, 48):  # shards 0, 1, 0, 2 (closes 1), 0, 1 (closes 2)
        reader.label(index, unique_labels.label_digits, unique_labels.num_classes)
        assert tar_descriptors() - before <= 2
    reader.close()
    assert tar_descriptors() == before


def test_the_open_file_limit_is_raised_for_the_shards_or_a_warning_names_it(monkeypatch, caplog):
    limits = {"soft": 300, "hard": 10_000}
    monkeypatch.setattr(shard_reader.resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(shard_reader.resource, "setrlimit", lambda _, values: limits.update(soft=values[0]))
    assert descriptor_budget(1000) == 1000 and limits["soft"] == 1000 + shard_reader.RESERVED_DESCRIPTORS
    limits.update(soft=300, hard=400)
    with caplog.at_level(logging.WARNING):
        assert descriptor_budget(1000) == 400 - shard_reader.RESERVED_DESCRIPTORS and limits["soft"] == 400
    assert "1000 tar shards, but the open-file limit" in caplog.text


def sample_of(split, index: int):
    shard, sample = split.samples()[index]
    return split.root / shard.tar, sample


def damaged(shard_set: ShardSet, index: int, *, member: str, data: bytes) -> ShardImages:
    """The val split's dataset, then sample ``index``'s ``image`` or ``label`` member overwritten in place (in a
    copy of the converted set)."""
    dataset = ShardImages(shard_set.val, small_spec(16), val_transform(small_spec(16)))
    tar, sample = sample_of(shard_set.val, index)
    with open(tar, "r+b") as f:
        f.seek(getattr(sample, member).offset)
        f.write(data)
    return dataset


def test_a_bad_label_is_an_error_naming_the_shard_and_the_sample(damageable: ShardSet):
    dataset = damaged(damageable, 7, member="label", data=b"240")  # 240 classes: 000..239
    tar, sample = sample_of(damageable.val, 7)
    with pytest.raises(ShardSetError, match=re.escape(f"{tar}: sample {sample.key!r} has class b'240'")):
        dataset[7]
    assert dataset[6][1] == 6


def test_an_image_that_cannot_be_decoded_is_an_error_naming_the_shard_and_the_sample(damageable: ShardSet):
    dataset = damaged(damageable, 3, member="image", data=b"\0" * 256)
    tar, sample = sample_of(damageable.val, 3)
    with pytest.raises(RuntimeError, match=re.escape(f"{tar}: sample {sample.key!r}: cannot be decoded")):
        dataset[3]


def test_a_truncated_tar_is_an_error_naming_the_shard_and_the_sample(damageable: ShardSet):
    dataset = ShardImages(damageable.val, small_spec(16), val_transform(small_spec(16)))
    tar, sample = sample_of(damageable.val, 47)  # the first shard's last sample (48th of 48)
    os.truncate(tar, sample.image.offset + 100)
    with pytest.raises(ShardSetError, match=re.escape(f"{tar}: sample {sample.key!r}: ") + ".* the end of the file"):
        dataset[47]
    assert dataset[46][1] == 46


def test_an_index_that_does_not_match_its_tar_is_an_error_naming_the_shard_and_the_sample(damageable: ShardSet):
    """The first sample's offsets in its shard's index moved by one tar block (the start checks read the last
    sample's header only): the header found there is not its member's."""
    shard = damageable.val.shards[0]
    index = damageable.root / shard.index
    lines = index.read_text().splitlines()
    shifted = " ".join(str(int(f) + 512) if i % 4 == 1 else f for i, f in enumerate(lines[1].split()))
    index.write_text("\n".join([lines[0], shifted, *lines[2:]]) + "\n")
    manifest = json.loads((damageable.root / MANIFEST).read_text())
    manifest["splits"]["val"]["shards"][0]["index_bytes"] = index.stat().st_size
    (damageable.root / MANIFEST).write_text(json.dumps(manifest))
    dataset = ShardImages(ShardSet.open(damageable.root).val, small_spec(16), val_transform(small_spec(16)))
    key = lines[1].split()[3].rsplit(".", 1)[0]
    with pytest.raises(
        ShardSetError, match=re.escape(f"{damageable.root / shard.tar}: sample {key!r}: its index places")
    ):
        dataset[0]
