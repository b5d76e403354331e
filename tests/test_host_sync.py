"""The host-sync probe itself (tests/host_sync.py): it reports every kind of synchronising call on device values,
including those inside C++ ops, and nothing computed on host values only."""

from __future__ import annotations

import pytest
import torch

from tests.host_sync import HostSyncProbe

SYNCS = {
    "item": lambda x, mask: x.sum().item(),
    "tolist": lambda x, mask: x.tolist(),
    "bool": lambda x, mask: bool(x.sum() > 0),
    "float": lambda x, mask: float(x.sum()),
    "format": lambda x, mask: f"{x.sum():.3f}",
    "cpu": lambda x, mask: x.cpu(),
    "to_cpu_string": lambda x, mask: x.to("cpu"),
    "to_cpu_device": lambda x, mask: x.to(torch.device("cpu"), torch.float64),
    "numpy": lambda x, mask: x.numpy(),
    "equal": lambda x, mask: torch.equal(x, x),
    "mask_index": lambda x, mask: x[mask],
    "mask_index_in_tuple": lambda x, mask: x[(mask,)],
    "mask_assign": lambda x, mask: x.clone().__setitem__(mask, 0.0),
    "where_one_argument": lambda x, mask: torch.where(mask),
    "nonzero": lambda x, mask: mask.nonzero(),
    "unique": lambda x, mask: torch.unique(x),
    "masked_select": lambda x, mask: x.masked_select(mask),
    "bincount": lambda x, mask: mask.long().bincount(),
    "repeat_interleave": lambda x, mask: x.repeat_interleave(mask.long()),
}
NO_SYNCS = {
    "arithmetic": lambda x, mask: (x * 2 + 1).relu().sum(),
    "to_same_device": lambda x, mask: x.to(mask.device),
    "to_dtype": lambda x, mask: x.to(torch.float16),
    "where_three_arguments": lambda x, mask: torch.where(mask, x, 0.0),
    "integer_index": lambda x, mask: x[torch.tensor([0, 2])],
    "shape": lambda x, mask: x.shape[0] + x.dim() + x.numel(),
    "masked_fill": lambda x, mask: x.masked_fill(mask, 0.0),
}


def _device_values(probe: HostSyncProbe) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1, 1, 8)
    probe.device_values([x])
    return x, x > 0  # the mask is computed from a device value: one too


@pytest.mark.parametrize("name", [*SYNCS, *NO_SYNCS])
def test_reports_exactly_the_synchronising_calls_on_device_values(name: str):
    with HostSyncProbe() as probe:
        x, mask = _device_values(probe)
        probe.label = "step"
        {**SYNCS, **NO_SYNCS}[name](x, mask)
    if name in NO_SYNCS:
        assert probe.syncs == []
    else:
        assert len(probe.syncs) == 1 and probe.syncs[0][0] == "step", probe.syncs
        assert "test_host_sync.py" in probe.syncs[0][2]  # where it happened


@pytest.mark.parametrize("name", SYNCS)
def test_quiet_on_host_values(name: str):
    """The same calls on values made on the host (a MixUp Beta draw, a seed) wait for no device."""
    with HostSyncProbe() as probe:
        probe.label = "step"
        x = torch.linspace(-1, 1, 8)
        SYNCS[name](x, x > 0)
        torch.distributions.Beta(torch.tensor(0.2), torch.tensor(0.2)).sample().item()
    assert probe.syncs == []


def test_device_values_propagate_through_every_op():
    with HostSyncProbe() as probe:
        x, _ = _device_values(probe)
        y = torch.nn.functional.linear(x.view(2, 4), torch.ones(3, 4))  # a host weight, a device input
        probe.label = "step"
        y.softmax(-1).argmax(-1).max().item()
    assert [why for _, why, _ in probe.syncs] == ["item: reads device values on the host"]


def test_records_only_while_labelled():
    with HostSyncProbe() as probe:
        x, _ = _device_values(probe)
        x.sum().item()
    assert probe.syncs == []
