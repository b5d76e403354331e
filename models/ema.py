"""An exponential moving average of the network's weights and BN statistics (Polyak averaging, as torchvision's
reference recipe's ``--model-ema``), kept on the device beside the network and evaluated every epoch.

The average is a plain deep copy of the network, so its state_dict has the network's keys (the LightningModule holds
it as ``ema_net``: a checkpoint holds ``ema_net.*`` beside ``net.*``), updated in place with one
``torch._foreach_lerp_`` over the floating-point parameters and buffers: no host-device sync. torch's
``swa_utils.AveragedModel`` is not used: it nests the copy under ``module.`` with an ``n_averaged`` counter, and reads
that counter on the host at every update (``bool(self.n_averaged == 0)``), a sync per step on a GPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightEMA:
    """``average <- decay x average + (1 - decay) x net`` after every ``every_n_steps``-th optimizer step.

    The average starts as a copy of the initial weights (those of ``model.net.weights`` when given) and is never
    reset; torchvision's reference instead copies the weights at its first update and at every update of the warmup
    epochs, a difference that fades within a few horizons of the average. ``decay`` is per update: with
    ``every_n_steps`` = k the horizon is k / (1 - decay) optimizer steps. Integer buffers (BN's
    ``num_batches_tracked``) are copied, not averaged.
    """

    decay: float
    every_n_steps: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.decay < 1.0 or self.every_n_steps < 1:
            raise ValueError(
                f"model.ema: decay must be in [0, 1) and every_n_steps >= 1, not {self.decay} and {self.every_n_steps}"
            )

    @staticmethod
    def average_of(net: nn.Module) -> nn.Module:
        """The average's starting point: a copy of ``net`` (take it before ``net.compile()``), out of autograd."""
        return copy.deepcopy(net).requires_grad_(False)

    def due(self, optimizer_steps: int) -> bool:
        """Whether the average is updated after the optimizer step that makes ``optimizer_steps`` in all."""
        return optimizer_steps % self.every_n_steps == 0

    @torch.no_grad()
    def update(self, average: nn.Module, net: nn.Module) -> None:
        """One update of ``average`` (made by ``average_of``) towards ``net``'s current weights and buffers."""
        pairs = list(zip([*average.parameters(), *average.buffers()], [*net.parameters(), *net.buffers()], strict=True))
        floating = [pair for pair in pairs if pair[0].is_floating_point()]
        integer = [pair for pair in pairs if not pair[0].is_floating_point()]
        torch._foreach_lerp_([mean for mean, _ in floating], [value for _, value in floating], 1.0 - self.decay)
        if integer:  # none in a network without BN (AlexNet, VGG); the foreach ops refuse empty lists
            torch._foreach_copy_([mean for mean, _ in integer], [value for _, value in integer])


def weight_ema(decay: float | None, every_n_steps: int = 1) -> WeightEMA | None:
    """``model.ema``'s target: None (no average) when ``decay`` is null."""
    return None if decay is None else WeightEMA(decay, every_n_steps)
