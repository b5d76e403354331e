"""Training and validation from a shard set: the same images and labels as the folders, every sample once per epoch
over the ranks, exact mid-epoch resume, and bad shards named at start or at the sample."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from data.dali import DaliLoaders
from data.datamodule import ImageNetDataModule
from data.ilsvrc import load_layout
from data.placement import BatchRequest, Placement, Shard
from data.shard_set import MANIFEST, ShardSet, ShardSetError
from data.spec import ImageSpec

from .conftest import PROJECT_ROOT
from .loaders import NODES, loader, small_spec


def _key(name: str) -> str:
    """A sample's name without its folder or tar: the file's stem, or the shard key's last part."""
    return name.rsplit(":", 1)[-1].rsplit("/", 1)[-1].rsplit(".", 1)[0]


def _val(kind: str, split, spec: ImageSpec) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader(kind, split, train=False, batch_size=16, spec=spec))
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def _fingerprints(images: torch.Tensor) -> list[float]:
    return [round(float(x), 3) for x in images.double().sum(dim=(1, 2, 3))]


@pytest.mark.parametrize("kind", ["dali", "torchvision"])
def test_val_from_shards_is_val_from_folders(small_demo_root: Path, small_demo_shards: Path, kind: str):
    """Same images, same labels, same class index; each val sample keyed by its file's name."""
    folders, shards = load_layout(small_demo_root), ShardSet.open(small_demo_shards)
    assert shards.wnids == folders.wnids and shards.names == folders.names
    spec = small_spec(32, 36)
    by_name = {}
    for split in (folders.val, shards.val):
        images, labels = _val(kind, split, spec)
        by_name[type(split).__name__] = {_key(n): (i, int(y)) for n, i, y in zip(split.paths, images, labels)}
    files, samples = by_name.values()
    assert sorted(files) == sorted(samples) and len(files) == 60
    for name, (image, label) in files.items():
        assert torch.equal(samples[name][0], image) and samples[name][1] == label, name


def test_two_ranks_read_every_train_sample_once_per_epoch_in_a_new_order(unique_label_shards: Path):
    """DALI over shards (one sample per class: labels name samples): the ranks' epochs have the same length and
    partition the samples, and the next epoch reads them in another order."""
    split = ShardSet.open(unique_label_shards).train
    node = DaliLoaders(device="cpu", shuffle_buffer=32)
    request = partial(BatchRequest, split, small_spec(32), 20, placement=Placement(workers=1))
    ranks = [node.train(request(shard=Shard(rank, 2)), seed=5) for rank in (0, 1)]
    epochs = []
    for _ in range(2):
        seen = [[labels.tolist() for _, labels in rank] for rank in ranks]
        assert [len(batches) for batches in seen] == [6, 6]  # 240 / 2 ranks / 20 per batch
        order = [label for batches in seen for batch in batches for label in batch]
        assert sorted(order) == list(range(240))  # every sample once in the epoch, over both ranks
        epochs.append(order)
    assert epochs[0] != epochs[1]


def test_mid_epoch_state_resumes_the_exact_batches_through_the_shuffle_buffer(small_demo_shards: Path):
    split = ShardSet.open(small_demo_shards).train
    spec = small_spec(32)

    def train_loader(trained: int):
        request = BatchRequest(split, spec, 20, Shard(), Placement(workers=1))
        return DaliLoaders(device="cpu", shuffle_buffer=64).train(request, seed=3, trained_batches=lambda: trained)

    straight, epochs = train_loader(0), []
    for epoch in range(3):
        batches = []
        for step, (images, labels) in enumerate(straight):
            batches.append((images.clone(), labels.clone()))
            if (epoch, step) == (1, 3):
                state = straight.state_dict()
        epochs.append(batches)
    resumed = train_loader(4)
    resumed.load_state_dict(state)
    for expected in (epochs[1][4:], epochs[2]):
        got = list(resumed)
        assert len(got) == len(expected)
        for (images, labels), (want_images, want_labels) in zip(got, expected):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


@pytest.fixture
def shard_copy(small_demo_shards: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(small_demo_shards, tmp_path / "shards"))


def _datamodule(root: Path) -> ImageNetDataModule:
    return ImageNetDataModule(root, small_spec(32), DaliLoaders(device="cpu"), batch_size=10, num_workers=1)


def test_the_datamodule_reads_a_shard_set_where_the_root_holds_a_manifest(small_demo_shards: Path):
    datamodule = _datamodule(small_demo_shards)
    assert isinstance(datamodule.layout, ShardSet)
    assert datamodule.train_batches_per_epoch(world_size=2) == 12 and len(datamodule.classes) == 4


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", r"train-000001\.tar: \d+ bytes, but .*manifest\.json records \d+ \(truncated or rewritten\)"),
        ("delete", r"train-000001\.tar: missing, but .*manifest\.json lists it"),
        ("swap_index", r"train-000001\.tar: sample .* its index places .* where the tar has tar member"),
        ("manifest", r"manifest\.json: malformed manifest \(KeyError"),
    ],
)
def test_a_damaged_set_stops_at_start_naming_the_file(shard_copy: Path, damage: str, message: str):
    tar, index = shard_copy / "train" / "train-000001.tar", shard_copy / "train" / "train-000001.idx"
    if damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:-4096])
    elif damage == "delete":
        tar.unlink()
    elif damage == "swap_index":
        other = shard_copy / "train" / "train-000002.idx"
        record = json.loads((shard_copy / MANIFEST).read_text())
        shutil.copy(other, index)  # the manifest updated as a careless copy would leave it: sizes match
        record["splits"]["train"]["shards"][1]["index_bytes"] = index.stat().st_size
        (shard_copy / MANIFEST).write_text(json.dumps(record))
    else:
        record = json.loads((shard_copy / MANIFEST).read_text())
        del record["classes"]
        (shard_copy / MANIFEST).write_text(json.dumps(record))
    with pytest.raises(ShardSetError, match=message):
        _ = _datamodule(shard_copy).layout


def _damage_a_label(root: Path) -> str:
    """Overwrites one sample's class in place (same size: the start check passes); its key."""
    shard = ShardSet.open(root).train.shards[1]
    sample = ShardSet.open(root).train.samples()[shard.samples + 7][1]
    with open(root / shard.tar, "r+b") as tar:
        tar.seek(sample.label.offset)
        tar.write(b"9" * sample.label.size)  # class 9 of 4
    return sample.key


@pytest.mark.parametrize("kind", NODES)
def test_a_sample_with_a_bad_class_stops_the_epoch_naming_shard_and_sample(shard_copy: Path, kind: str):
    key = _damage_a_label(shard_copy)
    split = ShardSet.open(shard_copy).train
    batches = loader(kind, split, train=True, batch_size=20, spec=small_spec(32))
    with pytest.raises(Exception, match=rf"train-000001\.tar: sample '{key}' has class b'9'") as caught:
        for _ in batches:
            pass
    assert "expected 1 digits naming one of 4 classes" in str(caught.value)


@pytest.mark.gpu
def test_gpu_decoding_of_shards_matches_the_cpu_pipeline(small_demo_shards: Path):
    """The mixed pipeline over shards: the labels parsed on the CPU travel with the images, train and val."""
    shard_set, spec = ShardSet.open(small_demo_shards), small_spec(32, 36)
    gpu = Placement(torch.device("cuda", torch.cuda.current_device()), workers=2)
    for train, split in ((False, shard_set.val), (True, shard_set.train)):
        on_gpu = loader("dali", split, train=train, batch_size=8, spec=spec, placement=gpu, device="mixed")
        on_cpu = loader("dali", split, train=train, batch_size=8, spec=spec, placement=Placement(workers=2))
        for (gpu_images, gpu_labels), (cpu_images, cpu_labels) in zip(on_gpu, on_cpu):
            assert gpu_images.is_cuda and gpu_labels.device == gpu_images.device
            assert torch.equal(gpu_labels.cpu(), cpu_labels)  # the same samples in the same order
            if not train:  # random crops differ between the devices' generators
                assert (gpu_images.cpu() - cpu_images).abs().mean() < 0.1  # nvJPEG vs libjpeg-turbo IDCT


@pytest.mark.parametrize("kind", NODES)
def test_a_sample_without_a_class_is_named_by_its_index_line(shard_copy: Path, kind: str):
    """An index line that lists a sample's image but no class (a shard written by another tool, or edited)."""
    index = shard_copy / "train" / "train-000002.idx"
    lines = index.read_text().splitlines()
    lines[5] = " ".join(lines[5].split()[:4])  # the image member alone
    index.write_text("\n".join(lines) + "\n")
    record = json.loads((shard_copy / MANIFEST).read_text())
    record["splits"]["train"]["shards"][2]["index_bytes"] = index.stat().st_size
    (shard_copy / MANIFEST).write_text(json.dumps(record))
    key = lines[5].split()[3].rsplit(".", 1)[0]
    split = ShardSet.open(shard_copy).train  # the start check reads the last line only
    with pytest.raises(Exception) as caught:
        for _ in loader(kind, split, train=True, batch_size=20, spec=small_spec(32)):
            pass
    if kind == "torchvision":  # the project's index reader names the line and the sample
        assert re.search(rf"train-000002\.idx:6: sample '{key}' has members \['jpg'\]", str(caught.value))
    else:  # DALI's names the index file, and the advice the check that names the sample
        assert re.search(r"Underful sample detected at index file at .*train-000002\.idx", str(caught.value))
        assert f"python -m data.shards --verify {shard_copy}" in str(caught.value)
        verify = [sys.executable, "-m", "data.shards", "--verify", str(shard_copy)]
        result = subprocess.run(verify, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and f"train-000002.idx:6: sample '{key}' has members ['jpg']" in result.stderr


def test_val_over_two_ranks_counts_each_sample_once_in_the_order_eval_expects(unique_label_shards: Path):
    """Each rank reads its contiguous part of the val shards (what ``val_order`` tells eval's report), the last batch
    partial: every sample once over the ranks."""
    split = ShardSet.open(unique_label_shards).val
    node = DaliLoaders(device="cpu")
    seen = []
    for rank in (0, 1):
        request = BatchRequest(split, small_spec(32), 16, Shard(rank, 2), Placement(workers=1))
        labels = [label for _, batch in node.val(request) for label in batch.tolist()]
        assert labels == list(DaliLoaders.val_order(len(split), Shard(rank, 2)))  # val sorted by key: label = index
        seen += labels
    assert sorted(seen) == list(range(240))
