"""Test-side callbacks: observe what each rank ends with, and interrupt a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch


class RankMetrics(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "val_batches": trainer.num_val_batches,
            "metrics": metrics,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class StopAfterEpochs(pl.Callback):
    """Interrupts a run cleanly after ``epochs`` epochs, as a preemption at an epoch boundary would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class BatchCounter(pl.Callback):
    """Counts the batches and distinct samples each epoch actually ran (the last instance is kept for tests)."""

    last: BatchCounter | None = None

    def __init__(self) -> None:
        self.train_batches_per_epoch: list[int] = []
        self.train_samples_per_epoch: list[int] = []
        self.val_batches_per_run: list[int] = []
        self.val_samples_per_run: list[int] = []
        BatchCounter.last = self

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_batches_per_epoch.append(0)
        self.train_samples_per_epoch.append(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_batches_per_epoch[-1] += 1
        self.train_samples_per_epoch[-1] += len(batch[1])

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_batches_per_run.append(0)
        self.val_samples_per_run.append(0)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches_per_run[-1] += 1
        self.val_samples_per_run[-1] += len(batch[1])


class SampleRecorder(pl.Callback):
    """Each rank writes, per trained batch, its labels and a fingerprint of every image (content and augmentation),
    to ``rank<R>.json``; and the same of its validation batches to ``rank<R>-val.json``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.batches, self.val_batches = Path(folder), [], []

    @staticmethod
    def _fingerprints(batch) -> list:
        images, labels = batch
        return [labels.tolist(), [round(float(x), 2) for x in images.double().sum(dim=(1, 2, 3))]]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(self._fingerprints(batch))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_batches.append(self._fingerprints(batch))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))
        (self.folder / f"rank{trainer.global_rank}-val.json").write_text(json.dumps(self.val_batches))


class InterruptAtStep(pl.Callback):
    """Saves a checkpoint after optimizer step ``step`` and stops, as a preemption in mid-epoch would."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class ValidationRecord(pl.Callback):
    """Each rank writes the reduced val metrics of the first validation and how many images it saw itself."""

    def __init__(self, folder: str) -> None:
        self.folder, self.images = Path(folder), 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.images += len(batch[1])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = self.folder / f"rank{trainer.global_rank}.json"
        if path.exists():
            return
        metrics = {name: float(value) for name, value in pl_module.val_metrics.compute().items()}
        # callbacks' epoch-end hooks run before the module's, which logs and resets the loss sums
        loss = pl_module.val_loss_sum.compute() / pl_module.val_images.compute()
        record = {"images": self.images, "metrics": metrics, "loss": float(loss)}
        self.folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))


class StepLog(pl.Callback):
    """Each rank appends every optimizer step it starts, with its SLURM restart count, to ``rank<R>.log`` at once."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.log", "a") as log:
            log.write(f"{trainer.global_step + 1} {os.environ.get('SLURM_RESTART_COUNT', '0')}\n")


class SampleLog(StepLog):
    """``StepLog`` with the batch's labels on the step's line: over a dataset of one image per class they name the
    samples, so a test can count how often each was trained."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.log", "a") as log:
            restart = os.environ.get("SLURM_RESTART_COUNT", "0")
            log.write(f"{trainer.global_step + 1} {restart} {' '.join(map(str, batch[1].tolist()))}\n")


class LossScaleAtStart(pl.Callback):
    """Keeps the 16-mixed loss scaler's scale as training starts, after a checkpoint was restored."""

    last: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        LossScaleAtStart.last = float(trainer.precision_plugin.scaler.get_scale())


class PoisonWeights(pl.Callback):
    """Makes the first weight NaN before the batch after optimizer step ``step``, as a diverging run would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).fill_(float("nan"))


class HangRank(pl.Callback):
    """Hangs global rank ``rank`` after training step ``step``: ``how=sleep`` sleeps forever in ``sleep_forever``
    (it can still report itself), ``how=stop`` stops the process (SIGSTOP: it cannot); writes the time it hangs
    to ``marker`` first."""

    def __init__(self, rank: int, step: int, how: str, marker: str) -> None:
        self.rank, self.step, self.how, self.marker = rank, step, how, Path(marker)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import signal
        import time

        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            self.marker.write_text(str(time.time()))
            if self.how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            self.sleep_forever()

    @staticmethod
    def sleep_forever() -> None:
        import time

        while True:
            time.sleep(60)


class SlowRank(pl.Callback):
    """Global rank ``rank`` takes ``seconds`` longer to get each training batch, as a slow loader would: the sleep is
    in the datamodule's ``on_after_batch_transfer``, between the fetch and the step (the other ranks wait for it in
    the step's gradient all-reduce)."""

    def __init__(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds = rank, seconds

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        import time

        datamodule = trainer.datamodule
        if trainer.global_rank != self.rank:
            return
        transfer = datamodule.on_after_batch_transfer

        def slow_transfer(batch, dataloader_idx: int):
            if trainer.training:
                time.sleep(self.seconds)
            return transfer(batch, dataloader_idx)

        datamodule.on_after_batch_transfer = slow_transfer


class SlowStartAndValidation(pl.Callback):
    """Sleeps ``seconds`` as training starts, and half of it after each validation batch: a slow start-up, and a
    slow validation that still makes progress."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        time.sleep(self.seconds)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        import time

        time.sleep(self.seconds / 2)


class HangIn(pl.Callback):
    """Global rank ``rank`` sleeps forever, during training, after its first validation batch (``where=validation``)
    or as it saves its first checkpoint (``where=checkpoint``), writing the time to ``marker`` first."""

    def __init__(self, rank: int, where: str, marker: str) -> None:
        self.rank, self.where, self.marker = rank, where, Path(marker)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.where == "validation" and not trainer.sanity_checking:
            self._hang(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.where == "checkpoint":
            self._hang(trainer)

    def _hang(self, trainer) -> None:
        import time

        if trainer.global_rank == self.rank:
            self.marker.write_text(str(time.time()))
            HangRank.sleep_forever()


class CrashAtStep(pl.Callback):
    """Raises after optimizer step ``step`` on global rank ``rank``, in every run: a bug that a restart repeats."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            raise RuntimeError(f"planted crash at step {self.step}")


class BroadcastCounter(pl.Callback):
    """Counts the calls to ``torch.distributed.broadcast`` while training (Lightning 2.6 makes one per DDP step,
    with a device synchronisation) and writes them to ``rank<R>-broadcasts.json`` at the end."""

    def __init__(self, folder: str) -> None:
        self.folder, self.calls, self._broadcast = Path(folder), 0, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._broadcast = torch.distributed.broadcast

        def counted(*args, **kwargs):
            self.calls += 1
            return self._broadcast(*args, **kwargs)

        torch.distributed.broadcast = counted

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.distributed.broadcast = self._broadcast
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank{trainer.global_rank}-broadcasts.json"
        path.write_text(json.dumps({"calls": self.calls, "steps": trainer.global_step}))


class BatchShapes(pl.Callback):
    """Each rank writes, per trained batch, its epoch and the images' shape, to ``rank<R>-shapes.json``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.shapes = Path(folder), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append([trainer.current_epoch, list(batch[0].shape)])

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}-shapes.json").write_text(json.dumps(self.shapes))
