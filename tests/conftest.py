"""Shared fixtures: composed Hydra configs, a small demo dataset, and runs of train.py as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from data.demo import SHAPES, ensure_demo_dataset, render
from data.ilsvrc import wordnet_names
from data.spec import ImageSpec
from models.card import ModelCard, architecture_of

# The session's SLURM cluster (the `cluster` fixture) for every test module that submits jobs.
pytest_plugins = ["tests.slurm_jobs"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# A small demo dataset and settings under which ResNet-18 learns it in seconds on 2 CPU cores.
SMALL_DEMO = dict(num_classes=4, train_per_class=60, val_per_class=15, short_side=48)
SMALL_RUN = [
    "experiment=demo",
    "data.spec.image_size=32",
    "data.spec.val_resize_size=36",
    "data.batch_size=20",
    "data.num_workers=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    *(f"data.root.{key}={value}" for key, value in SMALL_DEMO.items()),
]

# Enough data and pixels for ResNet-18 to learn 4 classes in under a minute on 2 cores (chance: 0.25).
LEARN = [
    *SMALL_RUN,
    "data.root.train_per_class=100",
    "data.root.short_side=64",
    "data.spec.image_size=48",
    "data.spec.val_resize_size=54",
    "data.batch_size=25",
    "optimizer.lr=0.3",
    "trainer.max_epochs=8",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def small_demo_root(cache_dir: Path) -> Path:
    return ensure_demo_dataset(cache_dir, **SMALL_DEMO)


def convert_to_shards(root: Path, out: Path, *options: str) -> Path:
    """``python -m data.shards ROOT OUT OPTIONS`` as a user runs it, its index cache beside OUT; OUT."""
    cache = f"--cache-dir={out.parent / 'index-cache'}"
    command = [sys.executable, "-m", "data.shards", str(root), str(out), "--workers", "2", cache, *options]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def one_image_per_class(folder: Path, classes: int) -> Path:
    """An ILSVRC layout of ``classes`` real ILSVRC samples (symbolic links to ../shared), one per class in train/ and
    the same in val/: a label then names its sample, whatever the augmentation does to the pixels."""
    samples = sorted((SHARED_DATA / "imagenet-samples").glob("*.JPEG"))[:classes]
    if len(samples) < classes:
        pytest.skip(f"needs {classes} ILSVRC samples in {SHARED_DATA / 'imagenet-samples'}")
    for split in ("train", "val"):
        for sample in samples:
            wnid = sample.name.split("_")[0]
            (folder / split / wnid).mkdir(parents=True, exist_ok=True)
            (folder / split / wnid / sample.name).symlink_to(sample)
    return folder


def one_demo_image_per_class(folder: Path, classes: int) -> Path:
    """An ILSVRC layout of ``classes`` of its wnids, one demo image (data/demo.py's shapes and textures in random
    colours, a JPEG) per class in train/ and another in val/: a label then names its sample."""
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(sorted(wordnet_names())[:classes]):
        for split, name in (("train", f"{wnid}_0"), ("val", f"{wnid}_val")):
            (folder / split / wnid).mkdir(parents=True, exist_ok=True)
            render(label % len(SHAPES), rng, short_side=48).save(folder / split / wnid / f"{name}.JPEG", quality=90)
    return folder


@pytest.fixture(scope="session")
def unique_label_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 classes of one image each as a shard set: train in 5 shards of 48, val in 5 of 48."""
    root = one_demo_image_per_class(tmp_path_factory.mktemp("unique-labels") / "imagenet", 240)
    return convert_to_shards(root, root.parent / "shards", "--shard-samples", "50")


@pytest.fixture(scope="session")
def small_demo_shards(small_demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo as a shard set: 240 train images in 5 shards of 48, 60 val images in 2 of 30."""
    return convert_to_shards(small_demo_root, tmp_path_factory.mktemp("shards") / "demo", "--shard-samples", "50")


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, as @hydra.main would, outputs under tmp_path."""

    def _compose(*overrides: str) -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.cache_dir={cache_dir}", *overrides], return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra  # as @hydra.main hands it over
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def build_module(model: DictConfig, classes: list[str] | tuple[str, ...], spec: ImageSpec | None = None):
    """``model`` (a composed ``cfg.model``) for these classes, as eval.py builds it: its optimizer goes unused."""
    card = ModelCard(tuple(classes), spec or ImageSpec(), architecture_of(model.net))
    return instantiate(model, _partial_=True)(card=card)


def run_train(
    *overrides: str, cache_dir: Path, run_dir: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python train.py OVERRIDES`` in a subprocess, the way a user runs it; ``env`` adds environment variables."""
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    environment = {**os.environ, **(env or {})}
    return subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout, env=environment)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run where CUDA is; elsewhere they are skipped with the reason."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
