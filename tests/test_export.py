"""Export to plain torchvision weights and back, and loads that never run code from a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate

from models.export import UnsafeCheckpointError, export, load_weights_only
from models.zoo import build_net
from tests.conftest import PROJECT_ROOT, SMALL_RUN, run_train
from train import train


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def checkpoint(make_cfg, small_demo_root: Path, tmp_path: Path) -> Path:
    """A real checkpoint of a short demo run (2 steps)."""
    cfg = make_cfg(*SMALL_RUN, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1")
    train(cfg)
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def test_exported_weights_load_strictly_into_torchvision_with_the_same_logits(make_cfg, checkpoint, tmp_path):
    out = export(checkpoint, tmp_path / "resnet18.pth")
    net = torchvision.models.resnet18(num_classes=4)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    module = instantiate(make_cfg(*SMALL_RUN).model, num_classes=4)
    module.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    images = torch.randn(3, 3, 32, 32)
    module.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(images), module(images))
    # and back: a run starts from torchvision-format weights
    started = instantiate(make_cfg(*SMALL_RUN, f"model.net.weights={out}").model, num_classes=4).eval()
    with torch.no_grad():
        assert torch.equal(started(images), module(images))


def test_export_command(checkpoint, tmp_path):
    out = tmp_path / "exported.pth"
    command = [sys.executable, "-m", "models.export", str(checkpoint), str(out)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(torch.load(out, weights_only=True)) == set(build_net("resnet18", 4).state_dict())


def test_crafted_checkpoint_is_refused_without_running(tmp_path: Path, cache_dir: Path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, crafted)
    with pytest.raises(UnsafeCheckpointError, match="refusing .*crafted.ckpt"):
        load_weights_only(crafted)
    with pytest.raises(UnsafeCheckpointError):
        build_net("resnet18", 4, weights=str(crafted))
    resumed = run_train(*SMALL_RUN, f"ckpt_path={crafted}", cache_dir=cache_dir, run_dir=tmp_path / "run")
    assert resumed.returncode != 0 and "Weights only load failed" in resumed.stderr
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # the file does run code when fully unpickled
    assert marker.exists()
