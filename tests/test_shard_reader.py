"""The torchvision loader over a shard set (data/shard_reader.py): the images, labels and batches of the same files
read from folders, each tar opened once per worker, and damaged shards named with the sample at fault."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from data import shard_reader
from data.ilsvrc import Split
from data.placement import Placement
from data.shard_reader import ShardImages, ShardReader, descriptor_budget
from data.shard_set import FORMAT, MANIFEST, VERSION, ShardSet, ShardSetError, file_sha256, label_text
from data.torchvision_backend import val_transform
from tests.conftest import SHARED_DATA
from tests.loaders import loader, small_spec

SAMPLES = SHARED_DATA / "imagenet-samples"
pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is absent")

Sample = tuple[str, Path, int]  # key, image file, label


def write_shard_set(out: Path, *, wnids: list[str], train: list[Sample], val: list[Sample], per_shard: int) -> Path:
    """A shard set laid out as ``python -m data.shards`` writes one (stands in for it until it lands): USTAR tars of
    ``<key>.jpg`` and ``<key>.cls``, DALI v1.2 index files, the manifest last."""
    digits = len(str(len(wnids) - 1))
    splits = {}
    for name, samples in (("train", train), ("val", val)):
        (out / name).mkdir(parents=True)
        shards = []
        for start in range(0, len(samples), per_shard):
            tar = out / name / f"{name}-{start // per_shard:06d}.tar"
            chunk = samples[start : start + per_shard]
            with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as archive:
                for key, path, label in chunk:
                    for member, data in ((f"{key}.jpg", path.read_bytes()), (f"{key}.cls", label_text(label, digits))):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        archive.addfile(info, io.BytesIO(data))
            with tarfile.open(tar) as archive:
                members = archive.getmembers()
            lines = [
                " ".join(f"{m.name.rsplit('.', 1)[1]} {m.offset_data} {m.size} {m.name}" for m in pair)
                for pair in zip(members[::2], members[1::2])
            ]
            index = tar.with_suffix(".idx")
            index.write_text("\n".join([f"v1.2 {len(chunk)}", *lines]) + "\n")
            shards.append(
                dict(
                    tar=str(tar.relative_to(out)),
                    index=str(index.relative_to(out)),
                    samples=len(chunk),
                    bytes=tar.stat().st_size,
                    index_bytes=index.stat().st_size,
                    sha256=file_sha256(tar),
                    index_sha256=file_sha256(index),
                )
            )
        per_class = Counter(label for _, _, label in samples)
        splits[name] = dict(per_class=[per_class[i] for i in range(len(wnids))], shards=shards)
    manifest = dict(
        format=FORMAT,
        version=VERSION,
        label_digits=digits,
        classes=dict(wnids=wnids, names=wnids),
        splits=splits,
    )
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def ilsvrc_samples(count: int | None = None, *, class_folders: bool = False) -> tuple[list[str], list[Sample]]:
    """The real ILSVRC files (one per class, sorted by wnid): their wnids, and a sample each labelled by its
    position; keys as the converter writes them, ``<wnid>/<stem>`` for train."""
    files = sorted(SAMPLES.iterdir())[:count]
    wnids = [file.name.split("_", 1)[0] for file in files]
    keys = [f"{wnid}/{file.stem}" if class_folders else file.stem for wnid, file in zip(wnids, files)]
    return wnids, [(key, file, label) for label, (key, file) in enumerate(zip(keys, files))]


def file_split(samples: list[Sample]) -> Split:
    return Split([str(path) for _, path, _ in samples], [label for _, _, label in samples])


@pytest.fixture(scope="module")
def real_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[ShardSet, list[Sample], list[Sample]]:
    """All 1000 files as val (4 shards), the first 200 as train (8 shards), and their samples."""
    wnids, val = ilsvrc_samples()
    train = ilsvrc_samples(200, class_folders=True)[1]
    root = write_shard_set(tmp_path_factory.mktemp("shards") / "set", wnids=wnids, train=train, val=val, per_shard=250)
    return ShardSet.open(root), train, val


@pytest.fixture
def small_set(tmp_path: Path) -> ShardSet:
    """12 files of 12 classes as val and train, in shards of 5 (damaged by the tests)."""
    wnids, samples = ilsvrc_samples(12)
    return ShardSet.open(write_shard_set(tmp_path / "set", wnids=wnids, train=samples, val=samples, per_shard=5))


def test_val_batches_are_those_of_the_same_files(real_set):
    shard_set, _, val = real_set
    spec = small_spec(48, resize=56)
    batches = [
        list(loader("torchvision", split, train=False, batch_size=100, spec=spec, placement=Placement(workers=2)))
        for split in (shard_set.val, file_split(val))
    ]
    assert len(batches[0]) == len(batches[1]) == 10
    for (shard_images, shard_labels), (file_images, file_labels) in zip(*batches):
        assert shard_images.dtype == torch.uint8 and torch.equal(shard_images, file_images)
        assert torch.equal(shard_labels, file_labels)
    assert torch.cat([labels for _, labels in batches[0]]).tolist() == list(range(1000))


def test_train_batches_are_those_of_the_same_files_with_the_same_seed(real_set):
    """The order and the augmentations are a function of (seed, epoch, index): the same for shards as for files."""
    shard_set, train, _ = real_set
    spec = small_spec(32, scale=(0.1, 1.0))
    loaders = [
        loader("torchvision", split, train=True, batch_size=16, spec=spec, seed=7, placement=Placement(workers=2))
        for split in (shard_set.train, file_split(train))
    ]
    for epoch in (0, 1):
        for batches in loaders:
            batches.sampler.set_epoch(epoch)
        pairs = list(zip(*loaders))
        assert len(pairs) == 12  # 200 images, 16 a batch, the last partial one dropped
        for (shard_images, shard_labels), (file_images, file_labels) in pairs:
            assert torch.equal(shard_images, file_images) and torch.equal(shard_labels, file_labels)


def test_ten_crops_over_shards(real_set):
    shard_set, _, val = real_set
    spec = small_spec(24, resize=32)
    first = [
        next(iter(loader("torchvision", split, train=False, batch_size=8, spec=spec, ten_crop=True)))
        for split in (shard_set.val, file_split(val))
    ]
    (shard_images, shard_labels), (file_images, file_labels) = first
    assert shard_images.shape == (8, 10, 3, 24, 24)
    assert torch.equal(shard_images, file_images) and shard_labels.tolist() == file_labels.tolist() == list(range(8))


def tar_descriptors() -> int:
    """Descriptors this process has open on .tar files (a real count, from /proc)."""
    fds = Path("/proc/self/fd")
    return sum(os.readlink(fds / fd).endswith(".tar") for fd in os.listdir(fds) if (fds / fd).is_symlink())


def test_each_worker_opens_each_shard_once_and_keeps_it(real_set, tmp_path: Path, monkeypatch):
    """Two workers over two epochs: every tar opened once per worker, none inherited from the parent (which read a
    sample before the workers were forked)."""
    shard_set, _, _ = real_set
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
    assert sorted(labels) == sorted(list(range(200)) * 2)
    opens = Counter(tuple(line.split(" ", 1)) for line in log.read_text().splitlines() if line.endswith(".tar"))
    assert set(opens.values()) == {1}  # no tar opened twice by one process
    tars = {pid: {path for p, path in opens if p == pid} for pid, _ in opens}
    workers = [pid for pid in tars if pid != str(os.getpid())]
    assert tars[str(os.getpid())] == {shard_set.train.tar_paths[0]} and len(workers) == 2
    assert all(tars[pid] == set(shard_set.train.tar_paths) for pid in workers)  # 100 random samples each: all 8


def test_beyond_the_descriptor_budget_the_least_recently_used_tar_is_closed(small_set: ShardSet, monkeypatch):
    monkeypatch.setattr(shard_reader, "descriptor_budget", lambda tars: 2)
    reader = ShardReader.of_split(small_set.val)  # 3 shards
    before = tar_descriptors()
    for index in (0, 5, 0, 10, 0, 5):  # shards 0, 1, 0, 2 (closes 1), 0, 1 (closes 2)
        reader.label(index, 2, 12)
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


def damaged(small_set: ShardSet, index: int, *, member: str, data: bytes) -> ShardImages:
    """The val split's dataset, then sample ``index``'s ``image`` or ``label`` member overwritten in place."""
    dataset = ShardImages(small_set.val, small_spec(16), val_transform(small_spec(16)))
    tar, sample = sample_of(small_set.val, index)
    with open(tar, "r+b") as f:
        f.seek(getattr(sample, member).offset)
        f.write(data)
    return dataset


def test_a_bad_label_is_an_error_naming_the_shard_and_the_sample(small_set: ShardSet):
    dataset = damaged(small_set, 7, member="label", data=b"12")  # 12 classes: 00..11
    tar, sample = sample_of(small_set.val, 7)
    with pytest.raises(ShardSetError, match=re.escape(f"{tar}: sample {sample.key!r} has class b'12'")):
        dataset[7]
    assert dataset[6][1] == 6


def test_an_image_that_cannot_be_decoded_is_an_error_naming_the_shard_and_the_sample(small_set: ShardSet):
    dataset = damaged(small_set, 3, member="image", data=b"\0" * 256)
    tar, sample = sample_of(small_set.val, 3)
    with pytest.raises(RuntimeError, match=re.escape(f"{tar}: sample {sample.key!r}: cannot be decoded")):
        dataset[3]


def test_a_truncated_tar_is_an_error_naming_the_shard_and_the_sample(small_set: ShardSet):
    dataset = ShardImages(small_set.val, small_spec(16), val_transform(small_spec(16)))
    tar, sample = sample_of(small_set.val, 11)  # the last shard's 2nd sample of 2
    os.truncate(tar, sample.image.offset + 100)
    with pytest.raises(ShardSetError, match=re.escape(f"{tar}: sample {sample.key!r}: ") + ".* the end of the file"):
        dataset[11]
    assert dataset[10][1] == 10


def test_an_index_that_does_not_match_its_tar_is_an_error_naming_the_shard_and_the_sample(small_set: ShardSet):
    """The first sample's offsets in its shard's index moved by one tar block (the start checks read the last
    sample's header only): the header found there is not its member's."""
    shard = small_set.val.shards[0]
    index = small_set.root / shard.index
    lines = index.read_text().splitlines()
    shifted = " ".join(str(int(f) + 512) if i % 4 == 1 else f for i, f in enumerate(lines[1].split()))
    index.write_text("\n".join([lines[0], shifted, *lines[2:]]) + "\n")
    manifest = json.loads((small_set.root / MANIFEST).read_text())
    manifest["splits"]["val"]["shards"][0]["index_bytes"] = index.stat().st_size
    (small_set.root / MANIFEST).write_text(json.dumps(manifest))
    dataset = ShardImages(ShardSet.open(small_set.root).val, small_spec(16), val_transform(small_spec(16)))
    key = lines[1].split()[3].rsplit(".", 1)[0]
    with pytest.raises(
        ShardSetError, match=re.escape(f"{small_set.root / shard.tar}: sample {key!r}: its index places")
    ):
        dataset[0]
