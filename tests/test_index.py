"""Indexing keeps broken files out with their reasons, lets ImageNet's valid oddities through as RGB, and caches;
in a job of several ranks one rank indexes and the others read its result without a look at the dataset."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from benchmarks.startup import calls_per_rank, counting_environment
from data import index
from data.ilsvrc import DatasetLayoutError, Split, load_layout
from data.index import IndexCache, IndexRole, IndexWaitError, indexed_layout, shared_layout
from data.spec import ConfigError
from train import train

from .conftest import SMALL_RUN, run_train
from .loaders import loader, small_spec, unnormalised
from .odd_images import NAMES, jpeg_bytes, picture, write_odd_images

BROKEN = {
    "empty.JPEG": "empty file",
    "truncated.JPEG": "truncated JPEG (no end marker, and torchvision cannot decode it: Image is incomplete",
    "random_bytes.JPEG": "not an image file",
    "text.JPEG": "not an image file",
}
BIG_TRAILER = "trailer_5mb.JPEG"
BROKEN_VAL = {"empty": "empty file", "truncated": "truncated JPEG (no end marker"}
ODDITIES = [*(f"{name}.JPEG" for name in NAMES), BIG_TRAILER]


def _write_specimens(folder: Path) -> None:
    """The broken files and the valid oddities (tests/odd_images.py, and a 5 MB trailer), in one train class
    folder."""
    whole = jpeg_bytes(picture())
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "truncated.JPEG").write_bytes(whole[: len(whole) // 2])
    (folder / "random_bytes.JPEG").write_bytes(np.random.default_rng(0).bytes(5000))
    (folder / "text.JPEG").write_text("not a picture\n")
    (folder / BIG_TRAILER).write_bytes(whole + np.random.default_rng(1).bytes(5 * 2**20))
    (folder / "notes.txt").write_text("a stray file")
    write_odd_images(folder)


@pytest.fixture
def seeded_root(tmp_path: Path, small_demo_root: Path) -> Path:
    """The small demo with the specimens in train/, and two of its val images broken (they keep their labels)."""
    root = tmp_path / "imagenet"
    shutil.copytree(small_demo_root, root)
    _write_specimens(next((root / "train").iterdir()))
    empty, truncated = sorted((root / "val").iterdir())[:2]
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:-500])
    return root


@pytest.mark.parametrize("mode", ["fast", "full"])
def test_index_excludes_exactly_the_broken_files(seeded_root: Path, tmp_path: Path, mode: str, caplog):
    layout = indexed_layout(load_layout(seeded_root), mode, tmp_path / "cache", workers=2)
    names = {Path(p).name for p in layout.train.paths}
    assert set(ODDITIES) <= names and not set(BROKEN) & names
    assert len(layout.train) == 240 + len(ODDITIES) and len(layout.val) == 60 - len(BROKEN_VAL)
    for name, reason in BROKEN.items():
        assert f"{name}: {reason}" in caplog.text
    for image, reason in zip(sorted((seeded_root / "val").iterdir())[:2], BROKEN_VAL.values()):
        assert str(image) not in layout.val.paths and f"{image}: {reason}" in caplog.text
    assert f"Excluded 6 of {300 + len(BROKEN) + len(ODDITIES)} files" in caplog.text


def _write_corrupt_huffman_table(folder: Path) -> Path:
    """A JPEG whose header parses and whose end marker is in place, but whose first Huffman table is garbage."""
    whole = jpeg_bytes(picture())
    table = whole.index(b"\xff\xc4") + 4  # the first Huffman table's definition
    corrupt = folder / "bad_huffman.JPEG"
    corrupt.write_bytes(whole[:table] + b"\xff" * 20 + whole[table + 20 :])
    return corrupt


def test_full_mode_decodes_what_fast_mode_only_parses(seeded_root: Path, tmp_path: Path, caplog):
    """A JPEG with a corrupt Huffman table: its header parses and its end marker is there (fast keeps it), but no
    decoder reads it (full leaves it out, with the decoder's reason)."""
    corrupt = _write_corrupt_huffman_table(next((seeded_root / "train").iterdir()))
    fast = indexed_layout(load_layout(seeded_root), "fast", tmp_path / "cache", workers=2)
    full = indexed_layout(load_layout(seeded_root), "full", tmp_path / "cache", workers=2)
    assert str(corrupt) in fast.train.paths and str(corrupt) not in full.train.paths
    assert len(full.train) == len(fast.train) - 1
    assert f"{corrupt}: torchvision cannot decode it: Bogus Huffman table definition" in caplog.text


def test_index_cache_rechecks_only_changed_files(seeded_root: Path, tmp_path: Path):
    layout = load_layout(seeded_root)
    indexed_layout(layout, "fast", tmp_path / "cache", workers=2)
    cache = IndexCache(tmp_path / "cache", seeded_root, "fast")
    assert len(cache.entries) == 300 + len(BROKEN) + len(ODDITIES)
    victim = layout.train.paths[-1]
    Path(victim).write_bytes(b"")  # broken after it was indexed: size and mtime change
    again = indexed_layout(layout, "fast", tmp_path / "cache", workers=2)
    assert victim not in again.train.paths and len(again.train) == len(layout.train) - len(BROKEN) - 1


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_oddities_decode_to_rgb(seeded_root: Path, backend: str):
    folder = next((seeded_root / "train").iterdir())
    names = ("grayscale", "cmyk", "rgb_png", "progressive")
    split = Split([str(folder / f"{name}.JPEG") for name in names], list(range(len(names))))
    spec = small_spec(64)
    images, labels = next(iter(loader(backend, split, train=False, batch_size=4, spec=spec)))
    images = unnormalised(images, spec) if backend == "dali" else images.float()
    assert images.shape == (4, 3, 64, 64) and labels.tolist() == [0, 1, 2, 3]
    gray, cmyk, png, progressive = images
    assert torch.allclose(gray[0], gray[1], atol=2) and torch.allclose(gray[1], gray[2], atol=2)
    reference = png  # lossless: the picture itself, through the same resize and crop
    assert reference[0].std() > 20 and (reference[0] - reference[2]).abs().mean() > 20  # really in colour
    for name, image in (("cmyk", cmyk), ("progressive", progressive)):
        assert (image - reference).abs().mean() < 8, name  # JPEG loss only: channels in order, not inverted


def test_training_runs_over_the_indexed_files(make_cfg, seeded_root: Path):
    """DALI, which stops at any unreadable file, trains on every good file (the oddities too) and validates on
    every good val image, exactly."""
    from tests.observers import BatchCounter

    overrides = ["data/loader=dali", "data.batch_size=4", "trainer.max_epochs=1", "+trainer.num_sanity_val_steps=0"]
    counter = ["+callbacks.counter._target_=tests.observers.BatchCounter"]
    train(make_cfg(*SMALL_RUN, f"data.root={seeded_root}", *overrides, *counter))
    assert BatchCounter.last.train_samples_per_epoch == [240 + len(ODDITIES)]
    assert BatchCounter.last.val_samples_per_run == [60 - len(BROKEN_VAL)]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_file_broken_after_indexing_stops_the_run_naming_it(make_cfg, seeded_root: Path, backend: str):
    cfg = make_cfg(
        *SMALL_RUN, f"data.root={seeded_root}", f"data/loader={backend}", "data.index=none", "trainer.max_epochs=1"
    )
    broken = r"(train/n\d{8}/(empty|truncated|random_bytes|text)|val/ILSVRC2012_val_0000000[12])\.JPEG"
    with pytest.raises(Exception, match=broken):
        train(cfg)


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_corrupt_body_that_fast_mode_lets_through_stops_the_run_naming_it(make_cfg, seeded_root: Path, backend: str):
    """What fast mode cannot promise: the run stops at the file, names it and says to check with --mode full."""
    corrupt = _write_corrupt_huffman_table(next((seeded_root / "train").iterdir()))
    cfg = make_cfg(*SMALL_RUN, f"data.root={seeded_root}", f"data/loader={backend}", "trainer.max_epochs=1")
    with pytest.raises(RuntimeError) as raised:
        train(cfg)
    assert str(corrupt) in str(raised.value) and "python -m data.index <data.root> --mode full" in str(raised.value)


def _role(rank: int, run: str = "this run") -> IndexRole:
    return IndexRole(global_rank=rank, local_rank=rank, world_size=2, run=run)


@pytest.fixture
def dataset_calls(monkeypatch) -> list[str]:
    """The paths this process passes to os.stat, os.lstat, os.scandir and os.listdir from now on."""
    paths: list[str] = []
    for name in ("stat", "lstat", "scandir", "listdir"):
        call = getattr(os, name)

        def recorded(path=".", *args, _call=call, **kwargs):
            paths.append(os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else "")
            return _call(path, *args, **kwargs)

        monkeypatch.setattr(os, name, recorded)
    return paths


def test_a_waiting_rank_reads_the_indexing_ranks_layout_without_a_look_at_the_dataset(
    seeded_root: Path, tmp_path: Path, dataset_calls: list[str]
):
    published = shared_layout(seeded_root, "fast", tmp_path / "cache", 2, _role(0))
    assert any(path.startswith(str(seeded_root)) for path in dataset_calls)
    dataset_calls.clear()
    read = shared_layout(seeded_root, "fast", tmp_path / "cache", 2, _role(1), wait_s=5)
    assert read == published and len(read.train) == 240 + len(ODDITIES)  # the broken files left out
    assert not [path for path in dataset_calls if path.startswith(str(seeded_root))]


def test_a_waiting_rank_stops_naming_the_cache_folder_when_no_result_of_its_run_comes(
    small_demo_root: Path, tmp_path: Path
):
    """A result of an earlier run (another run token) is not this run's: the rank waits for its own, then stops."""
    shared_layout(small_demo_root, "fast", tmp_path / "cache", 2, _role(0, run="an earlier run"))
    start = time.monotonic()
    with pytest.raises(IndexWaitError) as waited:
        shared_layout(small_demo_root, "fast", tmp_path / "cache", 2, _role(1), wait_s=1.5)
    assert 1.5 <= time.monotonic() - start < 5
    message = str(waited.value)
    assert str(tmp_path / "cache" / "index") in message and "local rank 0 on" in message
    assert "data.index_wait_s" in message and "python -m data.index" in message


def test_a_waiting_rank_stops_at_once_with_the_indexing_ranks_error(tmp_path: Path):
    missing = tmp_path / "no-such-dataset"
    with pytest.raises(DatasetLayoutError):
        shared_layout(missing, "fast", tmp_path / "cache", 2, _role(0))
    with pytest.raises(IndexWaitError, match=f"could not index {missing}: DatasetLayoutError: data root {missing}"):
        shared_layout(missing, "fast", tmp_path / "cache", 2, _role(1), wait_s=60)


def test_worker_count_follows_the_cores_this_process_may_use(small_demo_root, tmp_path: Path, make_cfg, monkeypatch):
    """A rank bound to one core (srun --cpu-bind, taskset) checks files with one worker, not one per core of the
    node: in the ``python -m data.index`` command and in training."""
    workers: list[int] = []

    class RecordingPool(index.ProcessPoolExecutor):
        def __init__(self, max_workers: int, **kwargs) -> None:
            workers.append(max_workers)
            super().__init__(max_workers, **kwargs)

    monkeypatch.setattr(index, "ProcessPoolExecutor", RecordingPool)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(sys, "argv", ["data.index", str(small_demo_root), "--cache-dir", str(tmp_path / "cli")])
    index.main()
    datamodule = instantiate(make_cfg(*SMALL_RUN, f"paths.cache_dir={tmp_path / 'train'}").data)
    assert len(datamodule.layout.train) == 240
    assert workers == [1, 1]


@pytest.mark.parametrize(
    ("override", "allowed"),
    [("data.index_scope=cluster", "node .* or job"), ("data.index_wait_s=0", "seconds > 0")],
)
def test_bad_index_coordination_values_name_key_value_and_what_is_allowed(make_cfg, override: str, allowed: str):
    with pytest.raises(Exception, match=f"{override.split('=')[0]}=.* is not allowed: {allowed}") as raised:
        instantiate(make_cfg(*SMALL_RUN, override).data)
    assert isinstance(raised.value.__cause__, ConfigError)  # Hydra's instantiate wraps it


@pytest.mark.slow
def test_ddp_ranks_other_than_the_indexing_one_look_at_no_dataset_path(
    small_demo_root: Path, tmp_path: Path, monkeypatch
):
    """Two CPU ranks on a fresh cache: rank 0 scans and checks every file; rank 1 makes no os.stat, os.lstat,
    os.scandir or os.listdir call on a path in the dataset (counted in every process by benchmarks/startup.py's
    sitecustomize) but the one that tells folders from a shard set (``<root>/manifest.json``), reads rank 0's
    result, and both train."""
    root, counts, ranks = tmp_path / "imagenet", tmp_path / "counts", tmp_path / "ranks"
    shutil.copytree(small_demo_root, root)
    for name, value in counting_environment(root, counts).items():
        monkeypatch.setenv(name, value)
    result = run_train(
        "data=imagenet",
        f"data.root={root}",
        "data.spec.image_size=32",
        "data.spec.val_resize_size=36",
        "data.batch_size=20",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "+callbacks.rank_metrics._target_=tests.observers.RankMetrics",
        f"+callbacks.rank_metrics.folder={ranks}",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    calls = calls_per_rank(counts)
    assert calls[0]["stat"] >= 300 and calls[0]["scandir"] >= 5  # every file; the 4 class folders and val/
    assert calls[1] == {"stat": 1}, calls[1]
    assert [json.loads((ranks / f"rank{r}.json").read_text())["global_step"] for r in (0, 1)] == [6, 6]
    log = result.stdout + result.stderr
    assert "Rank 0 (local rank 0 on" in log and "Rank 1 read the index of" in log
