"""Schedules step per iteration, change exactly at their epoch boundaries, and resume from their state; FFCV's linear
ramp step for step; the weight-decay exemptions of each recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torchvision.models import resnet18

from models.classifier import weight_decay_groups
from models.schedules import cosine, linear_ramp, multistep


def _optimizer(lr: float = 1.0) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _lrs(scheduler, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return lrs


def test_multistep_drops_at_the_milestone_step():
    lrs = _lrs(multistep(_optimizer(0.1), steps_per_epoch=10, milestones=[2, 3], gamma=0.1), 40)
    assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)
    assert lrs[29] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.001)


def test_linear_warmup_then_cosine_to_zero():
    lrs = _lrs(cosine(_optimizer(1.0), steps_per_epoch=10, max_epochs=5, warmup_epochs=1), 50)
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_state_dict_resumes_the_schedule():
    first = cosine(_optimizer(1.0), steps_per_epoch=7, max_epochs=4, warmup_epochs=0.5)
    straight = _lrs(first, 28)
    interrupted = cosine(_optimizer(1.0), steps_per_epoch=7, max_epochs=4, warmup_epochs=0.5)
    head = _lrs(interrupted, 11)
    resumed = cosine(_optimizer(1.0), steps_per_epoch=7, max_epochs=4, warmup_epochs=0.5)
    resumed.load_state_dict(interrupted.state_dict())
    resumed.optimizer.param_groups[0]["lr"] = interrupted.optimizer.param_groups[0]["lr"]
    assert head + _lrs(resumed, 17) == pytest.approx(straight)


def _ffcv_lrs(lr: float, epochs: int, lr_peak_epoch: float, iters: int) -> list[float]:
    """FFCV's ImageNet example (train_imagenet.py): ``get_cyclic_lr`` and its train loop's per-iteration lrs."""

    def get_lr(epoch):
        xs = [0, lr_peak_epoch, epochs]
        ys = [1e-4 * lr, lr, 0]
        return np.interp([epoch], xs, ys)[0]

    lrs = []
    for epoch in range(epochs):
        lr_start, lr_end = get_lr(epoch), get_lr(epoch + 1)
        lrs.extend(np.interp(np.arange(iters), [0, iters], [lr_start, lr_end]))
    return lrs


@pytest.mark.parametrize("peak_epoch", [2, 1.5])
def test_linear_ramp_is_ffcvs_schedule_at_every_step(peak_epoch: float):
    """Also where the peak is inside an epoch: FFCV interpolates between the values at whole epochs."""
    scheduler = linear_ramp(_optimizer(1.7), steps_per_epoch=7, max_epochs=5, peak_epoch=peak_epoch)
    assert _lrs(scheduler, 35) == pytest.approx(_ffcv_lrs(1.7, epochs=5, lr_peak_epoch=peak_epoch, iters=7), rel=1e-12)


def test_linear_ramp_config_builds_with_the_runs_steps(make_cfg):
    cfg = make_cfg("scheduler=linear_ramp", "trainer.max_epochs=4")
    lrs = _lrs(instantiate(cfg.scheduler, steps_per_epoch=3)(_optimizer(1.0)), 12)
    assert lrs[0] == pytest.approx(1e-4) and lrs[6] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 6)


def _group_names(no_weight_decay: str | None) -> list[set[str]]:
    net = resnet18(num_classes=10)
    names = {id(p): name for name, p in net.named_parameters()}
    return [{names[id(p)] for p in group["params"]} for group in weight_decay_groups(net, no_weight_decay)]


def test_weight_decay_groups_of_resnet18_for_each_recipe():
    """ResNet-18: 20 convolutions (no bias), 20 BN layers (3 of them in downsample branches), fc's weight and bias."""
    (everything,) = _group_names(None)
    convs = {name for name in everything if "conv" in name or "downsample.0" in name}
    fc = {"fc.weight", "fc.bias"}
    norms = everything - convs - fc
    downsample_bn = {f"layer{i}.0.downsample.1.{p}" for i in (2, 3, 4) for p in ("weight", "bias")}
    assert (len(everything), len(convs), len(norms)) == (62, 20, 40) and downsample_bn <= norms
    assert _group_names("norm") == [convs | fc, norms]
    assert _group_names("norm_and_bias") == [convs | {"fc.weight"}, norms | {"fc.bias"}]
    assert _group_names("ffcv_bn_names") == [convs | fc | downsample_bn, norms - downsample_bn]  # 28 and 34


def test_an_unknown_exemption_is_refused(make_cfg):
    from models.card import ModelCard

    cfg = make_cfg("model.no_weight_decay=bn")
    with pytest.raises(ValueError, match="model.no_weight_decay=bn: null, or one of"):
        instantiate(cfg.model, _partial_=True)(card=ModelCard(("a", "b")))
