"""The training step's hot path: no host read of a device value, nor an op that waits for the device (its output's
size depends on the values), between logging steps."""

from __future__ import annotations

import warnings

import pytest
import pytorch_lightning as pl
import torch

from tests.conftest import SMALL_RUN
from tests.host_sync import HostSyncProbe, TrainingStepSyncs
from train import train


@pytest.mark.slow
def test_train_and_val_steps_read_no_device_value_between_logging_steps(make_cfg, small_demo_root, monkeypatch):
    log_every = 5
    overrides = ["trainer.max_epochs=2", f"trainer.log_every_n_steps={log_every}", "trainer.enable_progress_bar=true"]
    cfg = make_cfg(*SMALL_RUN, *overrides)  # the progress bar (plain lines here) included
    probe = HostSyncProbe()
    monkeypatch.setattr("train.instantiate_all", _with(TrainingStepSyncs(probe)))
    with probe:
        train(cfg)
    # a step k reads only when it logs (k + 1 a multiple of log_every) or ends an epoch (12 steps per epoch);
    # validation steps never do
    allowed = {k for k in range(24) if (k + 1) % log_every == 0 or (k + 1) % 12 == 0}
    stray = [sync for sync in probe.syncs if sync[0] not in allowed]
    assert not stray, sorted({(why, where) for _, why, where in stray})
    assert any(sync[0] in allowed for sync in probe.syncs)  # the logging steps do read: the probe works


def _with(observer: pl.Callback):
    from assemble import instantiate_all

    def instantiate_with_observer(group):
        objects = instantiate_all(group)
        return [*objects, observer] if objects and isinstance(objects[0], pl.Callback) else objects

    return instantiate_with_observer


class FastPathProbe(pl.Callback):
    """What the first convolution receives in a training step, and the optimizer the trainer built."""

    def __init__(self) -> None:
        self.batches, self.conv_inputs, self.optimizers = [], [], []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.net.conv1.register_forward_pre_hook(self._conv_input)
        self.optimizers = trainer.optimizers
        self.cudnn_benchmark = torch.backends.cudnn.benchmark

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch[0].data_ptr(), batch[0].dtype))

    def _conv_input(self, conv: torch.nn.Module, inputs: tuple[torch.Tensor]) -> None:
        images = inputs[0]
        self.conv_inputs.append(
            {
                "data_ptr": images.data_ptr(),
                "channels_last": images.is_contiguous(memory_format=torch.channels_last) and images.shape[1] == 3,
                "weight_channels_last": conv.weight.is_contiguous(memory_format=torch.channels_last),
                "autocast": torch.is_autocast_enabled(images.device.type),
                "autocast_dtype": torch.get_autocast_dtype(images.device.type),
            }
        )


@pytest.mark.slow
def test_gpu_preset_switches_reach_the_model(make_cfg, small_demo_root, monkeypatch):
    """experiment=resnet50_fast on the CPU (bf16 autocast runs there): DALI's NHWC output is what the first
    convolution gets, without a copy, with channels_last weights, under bf16 autocast; the optimizer is fused;
    cudnn picks its fastest kernels (benchmark). The float16 batches that ``auto`` gives a GPU decoder, asked for."""
    cfg = make_cfg(
        "experiment=resnet50_fast",
        "trainer.accelerator=cpu",  # the rest of trainer=gpu as it is: bf16-mixed, cudnn benchmark
        "data.loader.output_dtype=float16",
        f"data.root={small_demo_root}",
        "data.spec.image_size=32",
        "data.spec.val_resize_size=36",
        "data.batch_size=16",
        "data.index=none",
        "+trainer.max_steps=3",
        "+trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
    )
    assert cfg.data.loader._target_ == "data.dali.DaliLoaders" and cfg.trainer.precision == "bf16-mixed"
    probe = FastPathProbe()
    monkeypatch.setattr("train.instantiate_all", _with(probe))
    train(cfg)
    (optimizer,) = probe.optimizers
    assert probe.cudnn_benchmark is True
    assert optimizer.defaults["fused"] is True and not optimizer.defaults["foreach"]
    training_inputs = probe.conv_inputs[: len(probe.batches)]
    assert len(probe.batches) == 3 and len(training_inputs) == 3
    for (batch_ptr, batch_dtype), seen in zip(probe.batches, training_inputs):
        assert batch_dtype == torch.float16
        assert seen["data_ptr"] == batch_ptr, "the batch was copied on its way to the first convolution"
        assert seen["channels_last"] and seen["weight_channels_last"]
        assert seen["autocast"] and seen["autocast_dtype"] == torch.bfloat16


class SyncWatch(pl.Callback):
    """CUDA's sync debug mode on ("warn") inside the training steps that do not log."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.global_step + 1) % trainer.log_every_n_steps:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_training_steps_do_not_synchronise(make_cfg, small_demo_root, monkeypatch):
    """The GPU preset with DALI decoding on the GPU: CUDA reports no synchronising call inside a non-logging step."""
    cfg = make_cfg(
        "experiment=resnet50_fast",
        "model=resnet18",
        f"data.root={small_demo_root}",
        "data.spec.image_size=32",
        "data.spec.val_resize_size=36",
        "data.batch_size=16",
        "data.index=none",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=5",
        "trainer.enable_progress_bar=false",
    )
    monkeypatch.setattr("train.instantiate_all", _with(SyncWatch()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    syncs = [str(w.message) for w in caught if "synchronizing" in str(w.message)]
    assert not syncs, syncs[:3]
