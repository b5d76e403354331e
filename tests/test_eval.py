"""eval.py: the training's own val figures from its checkpoint, ten crops, 2 ranks = 1 rank, the error analysis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from callbacks.error_analysis import analyse, format_report
from data.demo import ensure_demo_dataset
from data.ilsvrc import load_layout, wordnet_names
from data.spec import ImageSpec
from tests.conftest import PROJECT_ROOT, SMALL_DEMO, SMALL_RUN, run_train


def run_eval(*overrides: str, cache_dir: Path, run_dir: Path) -> dict:
    command = [sys.executable, "eval.py", f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch demo run: its folder and the cache holding its dataset."""
    folder = tmp_path_factory.mktemp("eval")
    result = run_train(*SMALL_RUN, "trainer.max_epochs=2", cache_dir=folder / "cache", run_dir=folder / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", folder / "cache"


@pytest.mark.slow
def test_single_crop_reproduces_the_training_figures_and_ten_crops_report_their_own(trained, tmp_path: Path):
    run, cache = trained
    logged = json.loads((run / "metrics.json").read_text())
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    single = run_eval(*SMALL_RUN, ckpt, cache_dir=cache, run_dir=tmp_path / "single")["summary"]
    assert single["images"] == 60
    assert single["top1_accuracy"] == pytest.approx(logged["val/acc1"], abs=1e-3)
    assert single["top5_accuracy"] == pytest.approx(logged["val/acc5"], abs=1e-3)
    assert single["top1_error"] == pytest.approx(1 - single["top1_accuracy"])
    ten = run_eval(*SMALL_RUN, ckpt, "data.val_crops=10", cache_dir=cache, run_dir=tmp_path / "ten")
    assert ten["summary"]["images"] == 60
    assert ten["summary"]["top1_accuracy"] == pytest.approx(_ten_crop_top1(run, cache), abs=1e-6)
    assert "top-1" in (tmp_path / "ten" / "report.txt").read_text()


def _ten_crop_top1(run: Path, cache: Path) -> float:
    """Ten-crop top-1 of the run's last checkpoint computed here with torchvision alone (Krizhevsky et al.: the
    corners, the centre and their mirrors, mean probability), as the reference for eval.py's."""
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    net = torchvision.models.resnet18(num_classes=4)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    net.eval()
    val = load_layout(ensure_demo_dataset(cache, **SMALL_DEMO)).val
    crops = v2.Compose([v2.Resize(36, antialias=True), v2.TenCrop(32)])
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (ImageSpec().mean, ImageSpec().std))
    correct = 0
    with torch.no_grad():
        for path, label in zip(val.paths, val.labels):
            image = decode_image(path, mode=ImageReadMode.RGB)
            batch = (torch.stack(crops(image)).float() - mean) / std
            correct += int(net(batch).softmax(-1).mean(0).argmax()) == label
    return correct / len(val)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [["data.val_crops=10"], ["data/loader=dali"]], ids=["ten-crop", "dali"])
def test_two_ranks_give_the_figures_of_one(trained, tmp_path: Path, protocol: list[str]):
    run, cache = trained
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    one = run_eval(*SMALL_RUN, ckpt, *protocol, cache_dir=cache, run_dir=tmp_path / "one")
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *protocol]
    two = run_eval(*SMALL_RUN, ckpt, *ddp, cache_dir=cache, run_dir=tmp_path / "two")
    assert one["summary"]["images"] == two["summary"]["images"] == 60  # each image once
    assert one["summary"] == pytest.approx(two["summary"])
    assert one["per_class"] == two["per_class"] and one["confused_pairs"] == two["confused_pairs"]


def test_error_analysis_figures():
    names = wordnet_names()
    wnids = ["n02085620", "n02085782", "n02701002"]  # Chihuahua, Japanese spaniel, ambulance
    labels = torch.tensor([0, 0, 1, 2])
    top5 = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0], [2, 0, 1]])  # right, near miss, far miss, right
    report = analyse(top5, labels, wnids, [names[w] for w in wnids], confusions=5)
    summary = report["summary"]
    assert summary["top1_accuracy"] == 0.5 and summary["top5_accuracy"] == 1.0 and summary["top1_error"] == 0.5
    near, far = 1, 12  # Chihuahua -> Japanese spaniel: siblings; Japanese spaniel -> ambulance: only "whole" shared
    assert summary["mistake_severity"] == pytest.approx((near + far) / 2)
    assert summary["hierarchical_distance_at_1"] == pytest.approx((near + far) / 4)
    assert [c["wnid"] for c in report["per_class"]] == ["n02085782", "n02085620", "n02701002"]  # worst first
    assert report["confused_pairs"][0]["count"] == 1
    assert "mistake severity 6.50" in format_report(report)
