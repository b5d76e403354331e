"""Learning-rate schedules stepped every optimizer step, with boundaries given in (fractional) epochs.

Each is one ``LambdaLR`` over a pure function of the step: exact on resume (its state is the step count), free of
the off-by-one traps of chaining schedulers with ``SequentialLR``, and shaped by the current config on resume
(a ``partial`` carries no state into the checkpoint), so a run can be extended by raising ``max_epochs``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _factor(step: int, steps_per_epoch: int, warmup_epochs: float, shape: Callable[[float], float]) -> float:
    """Multiplier of the base lr at ``step``: a linear warmup, then ``shape`` of the (fractional) epoch."""
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return shape(step / steps_per_epoch)


def multistep(
    optimizer: Optimizer,
    steps_per_epoch: int,
    milestones: Sequence[float],
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> LambdaLR:
    """lr x gamma at each milestone epoch (He et al. 2015: /10 at 30, 60, 80)."""

    def shape(epoch: float) -> float:
        return gamma ** sum(epoch >= m for m in milestones)

    return LambdaLR(
        optimizer, partial(_factor, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs, shape=shape)
    )


def cosine(
    optimizer: Optimizer,
    steps_per_epoch: int,
    max_epochs: float,
    warmup_epochs: float = 0.0,
    final_fraction: float = 0.0,
) -> LambdaLR:
    """Half-cosine from the base lr to ``final_fraction`` of it at ``max_epochs``, after a linear warmup."""

    def shape(epoch: float) -> float:
        progress = min(1.0, (epoch - warmup_epochs) / max(max_epochs - warmup_epochs, 1e-8))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(
        optimizer, partial(_factor, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs, shape=shape)
    )


def _per_epoch_interpolation(
    step: int, steps_per_epoch: int, epochs: Sequence[float], factors: Sequence[float]
) -> float:
    """The piecewise-linear ``factors`` at ``epochs``, taken at whole epochs and interpolated over each epoch's steps
    (FFCV's train loop: ``np.interp(arange(iters), [0, iters], [lr(epoch), lr(epoch + 1)])``)."""
    epoch, within = divmod(step, steps_per_epoch)
    start, end = np.interp([epoch, epoch + 1], epochs, factors)
    return float(start + (end - start) * within / steps_per_epoch)


def linear_ramp(
    optimizer: Optimizer,
    steps_per_epoch: int,
    max_epochs: float,
    peak_epoch: float = 2.0,
    initial_fraction: float = 1e-4,
    final_fraction: float = 0.0,
) -> LambdaLR:
    """FFCV's ImageNet schedule ("cyclic", ``get_cyclic_lr``): linear from ``initial_fraction`` of the base lr at
    epoch 0 up to the base lr at ``peak_epoch``, then linear down to ``final_fraction`` of it at ``max_epochs``;
    stepped per iteration as FFCV does (where ``peak_epoch`` is a whole number, the same function of the fractional
    epoch)."""
    epochs, factors = (0.0, peak_epoch, max_epochs), (initial_fraction, 1.0, final_fraction)
    return LambdaLR(
        optimizer, partial(_per_epoch_interpolation, steps_per_epoch=steps_per_epoch, epochs=epochs, factors=factors)
    )
