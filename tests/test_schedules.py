"""Schedules step per iteration, change exactly at their epoch boundaries, and resume from their state."""

from __future__ import annotations

import math

import pytest
import torch

from models.schedules import cosine, multistep


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
