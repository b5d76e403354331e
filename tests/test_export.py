"""Export to plain torchvision weights and back, and loads that never run code from a file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from data.spec import ImageSpec
from models.card import CARD, ModelCard
from models.export import UnsafeCheckpointError, export, load_weights_only
from models.zoo import build_net
from tests.conftest import PROJECT_ROOT, SMALL_RUN, build_module
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
    card = ModelCard.of_checkpoint(torch.load(checkpoint, weights_only=True), checkpoint)
    module = build_module(make_cfg(*SMALL_RUN).model, card.classes, card.image_spec)
    module.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    images = torch.randn(3, 3, 32, 32)
    module.eval(), net.eval()
    with torch.no_grad():
        assert torch.equal(net(images), module(images))
    # and back: a run starts from torchvision-format weights
    started = build_module(make_cfg(*SMALL_RUN, f"model.net.weights={out}").model, card.classes).eval()
    with torch.no_grad():
        assert torch.equal(started(images), module(images))


def test_export_command(checkpoint, tmp_path):
    out = tmp_path / "exported.pth"
    command = [sys.executable, "-m", "models.export", str(checkpoint), str(out)]
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(torch.load(out, weights_only=True)) == set(build_net("resnet18", 4).state_dict())
    card = json.loads(out.with_name("exported.pth.json").read_text())
    assert card["architecture"]["blurpool"] is None and card["weights"] == "raw"
    assert f"torchvision.models.resnet18(num_classes=4).load_state_dict(torch.load('{out}'))" in result.stdout


def hand_made_checkpoint(path: Path, blurpool: str | None, ema: bool) -> tuple[nn.Module, nn.Module]:
    """A checkpoint as models.classifier.ImageClassifier saves one (``net.*``, and ``ema_net.*`` when ``ema``) of a
    resnet18 with ``blurpool``, the raw network and its average (other weights) returned."""
    architecture = {"arch": "resnet18", "zero_init_residual": False, "blurpool": blurpool}
    raw, average = (build_net(num_classes=4, **architecture).eval() for _ in range(2))
    state = {f"net.{key}": value for key, value in raw.state_dict().items()}
    if ema:
        state |= {f"ema_net.{key}": value for key, value in average.state_dict().items()}
    card = ModelCard(("n01", "n02", "n03", "n04"), ImageSpec(), architecture)
    torch.save({"state_dict": state, CARD: card.to_dict()}, path)
    return raw, average


@pytest.mark.parametrize("blurpool", ["ffcv", "composer"])
def test_a_blurpool_export_is_refused_by_torchvision_and_rebuilt_by_build_net(tmp_path: Path, blurpool: str):
    raw, _ = hand_made_checkpoint(tmp_path / "last.ckpt", blurpool, ema=False)
    out = export(tmp_path / "last.ckpt", tmp_path / "blurred.pth")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*blur_filter"):
        torchvision.models.resnet18(num_classes=4).load_state_dict(torch.load(out, weights_only=True), strict=True)
    card = json.loads(out.with_name("blurred.pth.json").read_text())
    assert card["architecture"]["blurpool"] == blurpool and card["weights"] == "raw"
    assert card["load"].startswith("NOT loadable by torchvision.models.resnet18")
    rebuilt = build_net(**card["architecture"], num_classes=len(card["classes"]), weights=str(out)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), raw(images))


def test_export_takes_the_ema_weights_when_asked(tmp_path: Path):
    raw, average = hand_made_checkpoint(tmp_path / "last.ckpt", blurpool=None, ema=True)
    exported = {which: export(tmp_path / "last.ckpt", tmp_path / f"{which}.pth", which) for which in ("raw", "ema")}
    default = torch.load(export(tmp_path / "last.ckpt", tmp_path / "default.pth"), weights_only=True)
    assert all(torch.equal(value, raw.state_dict()[key]) for key, value in default.items())
    images = torch.randn(2, 3, 64, 64)
    for which, net in (("raw", raw), ("ema", average)):
        assert json.loads(exported[which].with_name(f"{which}.pth.json").read_text())["weights"] == which
        loaded = torchvision.models.resnet18(num_classes=4).eval()
        loaded.load_state_dict(torch.load(exported[which], weights_only=True), strict=True)
        with torch.no_grad():
            assert torch.equal(loaded(images), net(images))
    with torch.no_grad():
        assert not torch.equal(raw(images), average(images))  # the test tells the two apart


def test_export_refuses_ema_from_a_run_without_one(tmp_path: Path):
    hand_made_checkpoint(tmp_path / "last.ckpt", blurpool=None, ema=False)
    with pytest.raises(ValueError, match=r"no 'ema_net\.\*' weights: its run kept no moving average .*\(model.ema\)"):
        export(tmp_path / "last.ckpt", tmp_path / "ema.pth", weights="ema")
    assert not (tmp_path / "ema.pth").exists()


def test_export_command_says_a_blurpool_network_is_not_torchvision(tmp_path: Path):
    hand_made_checkpoint(tmp_path / "last.ckpt", blurpool="ffcv", ema=True)
    command = [sys.executable, "-m", "models.export", str(tmp_path / "last.ckpt"), str(tmp_path / "ema.pth")]
    result = subprocess.run([*command, "--weights", "ema"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "NOT loadable by torchvision.models.resnet18" in result.stdout
    rebuild = (
        f"build_net(arch='resnet18', zero_init_residual=False, blurpool='ffcv', num_classes=4, weights='{tmp_path}"
    )
    assert rebuild in result.stdout


def test_a_card_from_before_blurpool_means_none():
    old = {"classes": ["n01"], "image_spec": ImageSpec().to_dict(), "architecture": {"arch": "resnet18"}}
    assert ModelCard.from_dict(old).architecture == {"arch": "resnet18", "blurpool": None}


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint that runs code when fully unpickled, and the marker file that code would create."""
    marker, crafted = tmp_path / "code-ran", tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCode(marker)}, crafted)
    return crafted, marker


def test_crafted_checkpoint_is_refused_without_running(crafted: tuple[Path, Path]):
    path, marker = crafted
    with pytest.raises(UnsafeCheckpointError, match="refusing .*crafted.ckpt"):
        load_weights_only(path)
    with pytest.raises(UnsafeCheckpointError):
        build_net("resnet18", 4, weights=str(path))
    with pytest.raises(UnsafeCheckpointError):
        export(path, path.with_name("out.pth"))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file does run code when fully unpickled: the test can fail
    assert marker.exists()


@pytest.mark.parametrize(
    ("entry", "arguments", "message"),
    [
        ("train.py", ["ckpt_path={ckpt}"], "Weights only load failed"),  # resuming
        ("train.py", ["model.net.weights={ckpt}"], "refusing"),  # starting from weights
        ("eval.py", ["ckpt={ckpt}"], "refusing"),
        ("predict.py", ["ckpt={ckpt}", "inputs=[{images}]"], "refusing"),
    ],
    ids=["train-resume", "train-weights", "eval", "predict"],
)
def test_every_entry_point_refuses_a_crafted_checkpoint(
    crafted, small_demo_root: Path, tmp_path: Path, cache_dir: Path, entry: str, arguments: list[str], message: str
):
    path, marker = crafted
    filled = [a.format(ckpt=path, images=small_demo_root / "val") for a in arguments]
    command = [sys.executable, entry, *SMALL_RUN, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([*command, *filled], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-3000:]
    assert not marker.exists()
