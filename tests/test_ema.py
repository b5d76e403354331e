"""The moving average of the weights (models/ema.py) and what validation computes: the average equals a hand
computation, counts optimizer steps, is validated beside the network, is exact across a resume; test-time flip."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from models.card import ModelCard
from models.classifier import ImageClassifier
from models.ema import WeightEMA
from train import train

from .conftest import SMALL_RUN

CLASSES = ("a", "b", "c")


def _tiny_net(num_classes: int) -> nn.Module:
    """Parameters and BN buffers, floating-point and integer, in a few hundred weights."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, num_classes),
    )


def _module(**options) -> ImageClassifier:
    optimizer = partial(torch.optim.SGD, lr=0.1, momentum=0.9)
    return ImageClassifier(_tiny_net, ModelCard(CLASSES), optimizer, **options)


def _expected_average(initial: dict, states: list[dict], decay: float) -> dict:
    """The average by hand: starting from the initial state, ``a <- decay a + (1 - decay) w`` for each state given;
    integer buffers are the newest state's."""
    average = {name: tensor.clone() for name, tensor in initial.items()}
    for state in states:
        for name, tensor in state.items():
            mixed = decay * average[name] + (1 - decay) * tensor
            average[name] = mixed if tensor.is_floating_point() else tensor.clone()
    return average


def _assert_state_close(module: nn.Module, expected: dict) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_the_average_of_parameters_and_buffers_equals_a_hand_computation():
    torch.manual_seed(0)
    net, ema = _tiny_net(3), WeightEMA(decay=0.6, every_n_steps=2)
    average = ema.average_of(net)
    assert not any(p.requires_grad for p in average.parameters())
    initial, updated_with = {k: v.clone() for k, v in net.state_dict().items()}, []
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for step in range(1, 8):
        net(torch.randn(5, 3, 6, 6)).square().mean().backward()  # training mode: the BN statistics move too
        optimizer.step()
        optimizer.zero_grad()
        if ema.due(step):
            ema.update(average, net)
            updated_with.append({k: v.clone() for k, v in net.state_dict().items()})
    assert len(updated_with) == 3  # after steps 2, 4 and 6
    assert int(average[1].num_batches_tracked) == 6
    _assert_state_close(average, _expected_average(initial, updated_with, decay=0.6))


class _StateAfterSteps(pl.Callback):
    """The network's state at the start, and after every batch that ended with an optimizer step."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: ImageClassifier) -> None:
        self.initial, self.after_steps, self.steps = self._state(pl_module), [], 0

    def on_train_batch_end(self, trainer, pl_module: ImageClassifier, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.steps:
            self.steps = trainer.global_step
            self.after_steps.append((trainer.global_step, self._state(pl_module)))

    @staticmethod
    def _state(module: ImageClassifier) -> dict:
        return {name: tensor.clone() for name, tensor in module.net.state_dict().items()}


def test_the_module_updates_its_average_every_n_optimizer_steps_under_gradient_accumulation():
    torch.manual_seed(0)
    module = _module(ema=WeightEMA(decay=0.7, every_n_steps=2))
    data = TensorDataset(torch.randn(28, 3, 8, 8), torch.arange(28) % len(CLASSES))
    recorder = _StateAfterSteps()
    trainer = pl.Trainer(
        max_steps=7, accumulate_grad_batches=2, callbacks=[recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert [step for step, _ in recorder.after_steps] == list(range(1, 8))  # 14 batches, 7 optimizer steps
    due = [state for step, state in recorder.after_steps if step % 2 == 0]
    _assert_state_close(module.ema_net, _expected_average(recorder.initial, due, decay=0.7))


def _rows(run: Path, version: int) -> list[dict[str, str]]:
    with open(run / "csv" / f"version_{version}" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("val/acc1")]


def _final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def test_average_is_validated_beside_the_network_and_exact_across_a_resume(make_cfg, tmp_path: Path):
    """2 epochs straight == stopped after 1 and resumed, with the average updated every 2 optimizer steps (so the
    update due at step 2, the first after the resume, needs the checkpoint's step count), MixUp and CutMix (their
    draws keyed by step, not by the process's random state) and test-time flip: every tensor of the checkpoint
    equal, ``ema_net.*`` included; val_ema/* logged every epoch beside val/*."""
    base = [
        *SMALL_RUN, "data.root.train_per_class=5", "data.root.val_per_class=5", "data.spec.image_size=16",
        "data.spec.val_resize_size=18", "+trainer.num_sanity_val_steps=0", "trainer.max_epochs=2",
        "model.ema.decay=0.5", "model.ema.every_n_steps=2", "model.mixing.mixup_alpha=0.2",
        "model.mixing.cutmix_alpha=1.0", "model.test_time_flip=true",
    ]  # fmt: skip
    train(make_cfg(*base))
    reference = _final_state(tmp_path / "run")
    rows = _rows(tmp_path / "run", version=0)
    assert len(rows) == 2
    for row in rows:
        assert all(0 <= float(row[f"{prefix}/{name}"]) for prefix in ("val", "val_ema") for name in ("acc1", "acc5"))
        assert float(row["val_ema/loss"]) > 0 and float(row["val/loss"]) > 0
    (tmp_path / "run").rename(tmp_path / "straight")

    interrupt = ["+callbacks.interrupt._target_=tests.observers.StopAfterEpochs", "+callbacks.interrupt.epochs=1"]
    train(make_cfg(*base, *interrupt))
    train(make_cfg(*base, "ckpt_path=last"))
    state = _final_state(tmp_path / "run")
    assert state["global_step"] == reference["global_step"] == 2  # one batch per epoch
    networks = [name.removeprefix("net.") for name in reference["state_dict"] if name.startswith("net.")]
    assert [name for name in reference["state_dict"] if name.startswith("ema_net.")] == [
        f"ema_net.{name}" for name in networks
    ]
    assert state["state_dict"].keys() == reference["state_dict"].keys()
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(state["state_dict"][name], tensor), name
    assert not torch.equal(reference["state_dict"]["ema_net.fc.weight"], reference["state_dict"]["net.fc.weight"])


def test_a_checkpoint_loads_with_or_without_its_average():
    """A checkpoint with an average loads where EMA is off (predict.py's network); one without loads where it is on,
    the average starting from its weights."""
    with_average, without = _module(ema=WeightEMA(decay=0.9)), _module()
    with torch.no_grad():
        for parameter in with_average.ema_net.parameters():
            parameter.add_(1.0)
    without.load_state_dict(with_average.state_dict())
    _assert_state_close(without.net, with_average.net.state_dict())
    fresh = _module(ema=WeightEMA(decay=0.9))
    fresh.load_state_dict(without.state_dict())
    _assert_state_close(fresh.ema_net, without.net.state_dict())


def test_test_time_flip_scores_the_mean_of_the_image_and_its_mirror_for_the_network_and_its_average():
    torch.manual_seed(0)
    module = _module(ema=WeightEMA(decay=0.9), test_time_flip=True).eval()
    with torch.no_grad():
        for parameter in module.ema_net.parameters():
            parameter.mul_(0.5)
        images = torch.randn(4, 3, 8, 8)
        for net in (module.net, module.ema_net):
            expected = (net(images) + net(images.flip(-1))) / 2
            torch.testing.assert_close(module.class_scores(net, images), expected)
        assert not torch.allclose(module.class_scores(module.net, images), module.net(images))
        with pytest.raises(ValueError, match="ten crops already hold each crop's mirror; use one or the other"):
            module.class_scores(module.net, torch.randn(2, 10, 3, 8, 8))
