"""predict.py over real ILSVRC JPEGs, over a folder with a broken file, and over tar shards."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.ilsvrc import load_layout, wordnet_names
from data.shard_set import ShardSet
from data.shards import sample_key
from models.card import CARD
from tests.conftest import PROJECT_ROOT, SHARED_DATA, build_module

SAMPLES = SHARED_DATA / "imagenet-samples"


def save_checkpoint(make_cfg, wnids: list[str], path: Path) -> Path:
    """A ResNet-18 checkpoint in the project's format (randomly initialised) for these classes."""
    module = build_module(make_cfg().model, wnids)
    torch.save({"state_dict": module.state_dict(), CARD: module.card.to_dict()}, path)
    return path


def predict(*overrides: str, cache_dir: Path, run_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "predict.py", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)


SMALL_IMAGES = ["data.spec.image_size=64", "data.spec.val_resize_size=73", "data.batch_size=100", "data.num_workers=2"]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason=f"{SAMPLES} is absent")
def test_predicts_all_real_ilsvrc_samples_with_names(make_cfg, tmp_path: Path, cache_dir: Path):
    ckpt = save_checkpoint(make_cfg, sorted(wordnet_names()), tmp_path / "imagenet.ckpt")
    result = predict(f"ckpt={ckpt}", f"inputs=[{SAMPLES}]", *SMALL_IMAGES, cache_dir=cache_dir, run_dir=tmp_path / "p")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{SAMPLES}/")]
    assert len(lines) == 1000 and "1000 image(s) classified, 0 skipped" in result.stdout + result.stderr
    names = set(wordnet_names().values())
    for line in lines:
        path, top = line.split(": ", 1)
        entries = top.split(" | ")
        assert Path(path).parent == SAMPLES and len(entries) == 5
        probability, wnid, name = entries[0].split(" ", 2)
        assert 0 < float(probability) <= 1 and wnid.startswith("n") and name in names


def test_broken_file_is_reported_and_skipped(make_cfg, small_demo_root: Path, tmp_path: Path, cache_dir: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for image in sorted((small_demo_root / "val").iterdir())[:3]:
        shutil.copy(image, folder)
    (folder / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    wnids = sorted(p.name for p in (small_demo_root / "train").iterdir())
    ckpt = save_checkpoint(make_cfg, wnids, tmp_path / "demo.ckpt")
    result = predict(f"ckpt={ckpt}", f"inputs=[{folder}]", *SMALL_IMAGES, cache_dir=cache_dir, run_dir=tmp_path / "p")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len([line for line in result.stdout.splitlines() if line.startswith(f"{folder}/")]) == 3
    output = result.stdout + result.stderr
    assert f"{folder / 'broken.JPEG'}: skipped, cannot be decoded" in output
    assert "3 image(s) classified, 1 skipped" in output


def test_predicts_a_shard_sets_val_split_and_a_tar_naming_each_sample(
    make_cfg, unique_label_shards: Path, tmp_path: Path, cache_dir: Path
):
    """A shard set's folder stands for its val split, a tar for its samples: each named ``<tar>:<key>``; a sample
    that cannot be decoded is reported and skipped like a file. The set: conftest's conversion of 240 classes of one
    demo image each (val in 5 shards of 48, sorted by key), its first train shard copied and damaged."""
    root = unique_label_shards
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("train-000000.tar", "train-000000.idx"):
        shutil.copy(root / "train" / name, loose)
    lines = (loose / "train-000000.idx").read_text().splitlines()
    tar, (_, offset, _, member) = loose / "train-000000.tar", lines[1].split()[:4]
    with open(tar, "r+b") as f:  # the tar's first image made undecodable, in place
        f.seek(int(offset))
        f.write(b"\0" * 256)
    ckpt = save_checkpoint(make_cfg, sorted(wordnet_names()), tmp_path / "imagenet.ckpt")
    inputs = f"inputs=[{root},{tar}]"
    result = predict(f"ckpt={ckpt}", inputs, *SMALL_IMAGES, cache_dir=cache_dir, run_dir=tmp_path / "p")
    assert result.returncode == 0, result.stderr[-3000:]
    prefixes = (f"{root}/", f"{tar}:")  # the set lies outside tmp_path (a session fixture)
    named = [line.split(": ", 1)[0] for line in result.stdout.splitlines() if line.startswith(prefixes)]
    source = load_layout(ShardSet.open(root).manifest["source"]["root"]).val.paths
    val = [
        f"{root}/val/val-00000{i // 48}.tar:{key}" for i, key in enumerate(sorted(sample_key(p, "val") for p in source))
    ]
    train = [f"{tar}:{line.split()[3].rsplit('.', 1)[0]}" for line in lines[2:]]  # the tar's samples after the first
    assert len(val) == 240 and len(train) == 47 and named == val + train
    output = result.stdout + result.stderr
    assert f"{tar}:{member.rsplit('.', 1)[0]}: skipped, cannot be decoded" in output
    assert "287 image(s) classified, 1 skipped" in output
