"""The training step's hot path: no host read of a device value between logging steps."""

from __future__ import annotations

import traceback

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import SMALL_RUN
from train import train

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
DATA_LOADING = ("torchvision/transforms", "torch/utils/data", "data/torchvision_backend.py")


class HostReads(pl.Callback):
    """Records, per optimizer step of the training epochs, the places that read a tensor's value on the host."""

    def __init__(self) -> None:
        self.in_epoch, self.step, self.reads = False, 0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.in_epoch, self.step = True, trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.in_epoch = False

    def on_validation_start(self, trainer, pl_module) -> None:
        self.in_epoch = False

    def record(self, name: str) -> None:
        if not self.in_epoch:
            return
        stack = traceback.extract_stack()[:-2]
        if any(part in frame.filename for frame in stack for part in DATA_LOADING):
            return  # CPU tensors of the input pipeline (augmentation parameters), not the model's device
        where = " < ".join(f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in stack[-6:])
        self.reads.append((self.step, name, where))


@pytest.mark.slow
def test_training_steps_read_no_device_value_between_logging_steps(make_cfg, small_demo_root, monkeypatch):
    log_every = 5
    overrides = ["trainer.max_epochs=2", f"trainer.log_every_n_steps={log_every}", "trainer.enable_progress_bar=true"]
    cfg = make_cfg(*SMALL_RUN, *overrides)  # the progress bar (plain lines here) included
    observer = HostReads()
    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            observer.record(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    monkeypatch.setattr("train.instantiate_all", _with(observer))
    train(cfg)
    # a step k reads only when it logs (k + 1 a multiple of log_every) or ends an epoch (12 steps per epoch)
    allowed = {k for k in range(24) if (k + 1) % log_every == 0 or (k + 1) % 12 == 0}
    stray = [read for read in observer.reads if read[0] not in allowed]
    assert not stray, sorted({(name, where) for _, name, where in stray})
    assert any(read[0] in allowed for read in observer.reads)  # the logging steps do read: the probe works


def _with(observer: pl.Callback):
    from train import instantiate_all

    def instantiate_with_observer(group):
        objects = instantiate_all(group)
        return [*objects, observer] if objects and isinstance(objects[0], pl.Callback) else objects

    return instantiate_with_observer
