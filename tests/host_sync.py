"""A probe for host-device synchronisation that works in a CPU-only run: it reports the calls that would make the
host wait for a GPU, had the same code run on one.

On a CPU nothing synchronises, so the probe follows where the device's values go instead: the parameters, buffers,
gradients and the batch handed to the device are device values, and so is every tensor a torch function computes
from one (a ``TorchFunctionMode`` sees every torch function and ``Tensor`` method, including those that Python
monkeypatching cannot reach: indexing, ``.to()``, ``torch.where``). A call on a device value is reported when it

- reads values on the host (``.item()``, ``bool()``, ``.tolist()``, ``.cpu()``, ``.to("cpu")``, ``print``, ...),
- or makes a tensor whose size depends on the values (``nonzero``, ``unique``, ``torch.where(cond)``, boolean-mask
  indexing ``x[mask]`` and ``x[mask] = v``, ...): the device must finish before the host knows the size.

Values made on the host that never touch the device (a Beta draw for MixUp, a seed) are not device values, so
reading them is no synchronisation and is not reported.
"""

from __future__ import annotations

import linecache
import sys
import traceback
import weakref
from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

HOST_READS = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
        "__format__",
        "__repr__",
        "__str__",
        "__array__",
        "__contains__",
        "equal",
        "allclose",
        "is_nonzero",
    }
)
VALUE_SIZED = frozenset({"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount"})
INDEXING = frozenset({"__getitem__", "__setitem__", "index", "index_put", "index_put_"})


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(tree: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _has_bool_index(index: Any) -> bool:
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_host(args: tuple, kwargs: dict, caller: str) -> bool:
    """``Tensor.to(...)`` aimed at the host: a device-to-host copy on a GPU. In a CPU run the host and the device
    are the same ``torch.device``, so intent is read from the spelling: a target named "cpu" (a string, or in the
    calling line's source) goes to the host; ``x.to(other.device)`` and ``x.to(self.device)`` stay on the device."""
    targets = [kwargs.get("device"), *args[1:]]
    for target in targets:
        if isinstance(target, str):
            return torch.device(target).type == "cpu"
        if isinstance(target, torch.device):
            return target.type == "cpu" and "cpu" in caller
    return False


def synchronises(func: Any, args: tuple, kwargs: dict, caller: str = "") -> str | None:
    """Why calling ``func`` on device values would synchronise, or None; ``caller``: the calling line's source."""
    name = _name(func)
    if name in HOST_READS:
        return "reads device values on the host"
    if name == "to" and _to_host(args, kwargs, caller):
        return "copies device values to the host"
    if name in VALUE_SIZED:
        return "output size depends on device values"
    if name == "where" and len(args) + len(kwargs) == 1:
        return "torch.where(condition): output size depends on device values"
    repeats = kwargs.get("repeats", args[1] if len(args) > 1 else None)
    if name == "repeat_interleave" and isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
        return "repeat_interleave by a tensor: output size depends on device values"
    if name in INDEXING and len(args) > 1 and _has_bool_index(args[1]):
        return "boolean-mask indexing: output size depends on device values"
    return None


class HostSyncProbe(TorchFunctionMode):
    """Records ``(label, why, where)`` for every call on device values that would synchronise, while ``label`` is
    set (None: not recording). Use as a context manager around the code under test; mark the roots with
    ``device_values``."""

    def __init__(self) -> None:
        super().__init__()
        self.label: Any = None
        self.syncs: list[tuple[Any, str, str]] = []
        self._device_values: dict[int, weakref.ref] = {}

    def device_values(self, tensors: Iterable[Any]) -> None:
        for tensor in _tensors(list(tensors)):
            self._device_values[id(tensor)] = weakref.ref(tensor)

    def is_device_value(self, tensor: torch.Tensor) -> bool:
        ref = self._device_values.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if any(self.is_device_value(t) for t in _tensors((args, kwargs))):
            caller = sys._getframe(1)
            why = synchronises(func, args, kwargs, linecache.getline(caller.f_code.co_filename, caller.f_lineno))
            if why is not None and self.label is not None:
                stack = traceback.extract_stack()[:-1]
                where = " < ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in stack[-14:][::-1])
                self.syncs.append((self.label, f"{_name(func)}: {why}", where))
            self.device_values([result])
        return result


class TrainingStepSyncs(pl.Callback):
    """Points a ``HostSyncProbe`` at a Lightning run: parameters, buffers, the batch as the strategy moves it to
    the device, and the gradients are device values; calls are recorded with the global step of the training step
    they happen in, or with ``("val", epoch, batch)`` for a validation step."""

    def __init__(self, probe: HostSyncProbe) -> None:
        self.probe = probe

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.device_values([*pl_module.parameters(), *pl_module.buffers()])
        strategy = trainer.strategy
        to_device = strategy.batch_to_device

        def batch_to_device(batch, *args, **kwargs):
            if trainer.training:  # the step this batch is for: syncs while it is moved and normalised count there
                self.probe.label = trainer.global_step
            moved = to_device(batch, *args, **kwargs)
            self.probe.device_values([moved])
            return moved

        strategy.batch_to_device = batch_to_device

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.probe.device_values([batch])  # already moved and normalised, in case a loader bypasses the strategy
        self.probe.label = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.probe.device_values(p.grad for p in pl_module.parameters() if p.grad is not None)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.probe.label = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.probe.device_values([batch])
        self.probe.label = ("val", trainer.current_epoch, batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.probe.label = None  # the epoch end reduces and logs: a read there is once per validation
