"""Images/s, time waiting for data, step and epoch time, peak GPU memory; whether an epoch was data-bound; and which
rank the others wait for."""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl
import torch

from callbacks.stragglers import Stragglers

log = logging.getLogger(__name__)


class ThroughputMonitor(pl.Callback):
    """Times every training step on the host and reports every ``trainer.log_every_n_steps`` steps.

    The wait for data is the time from the end of one step to the start of the next, where Lightning fetches the
    batch: a loader that keeps up hands it over at once. Only clocks are read per step (no device synchronisation);
    on a GPU the host runs ahead of the device by a few steps, which averages out over a reporting window. Written
    by hand because Lightning's own ThroughputMonitor synchronises the device at every step.

    With several ranks, each report also compares the ranks (``callbacks/stragglers.py``: ``perf/slowest_rank``,
    ``perf/slowest_ratio``, a warning for a rank slower than ``straggler_factor`` times the others for
    ``straggler_logs`` reports in a row). Here rather than in a callback of its own: the window's figures exist at
    this point on every rank, at the same step, and another callback would have to run after this one to read them.
    """

    def __init__(
        self, data_bound_fraction: float = 0.2, straggler_factor: float = 1.5, straggler_logs: int = 3
    ) -> None:
        self.data_bound_fraction = data_bound_fraction
        self.images_per_s: float | None = None
        self.stragglers = Stragglers(straggler_factor, straggler_logs)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed in mid-epoch gets no epoch start
        self.stragglers.start(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start = self.window_start = self.last_step_end = time.perf_counter()
        self.window = {"steps": 0, "images": 0, "wait": 0.0}
        self.epoch = {"steps": 0, "images": 0, "wait": 0.0}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        wait = time.perf_counter() - self.last_step_end
        for totals in (self.window, self.epoch):
            totals["steps"] += 1
            totals["images"] += batch[1].shape[0]
            totals["wait"] += wait

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.last_step_end = time.perf_counter()
        if self.window["steps"] < trainer.log_every_n_steps:
            return
        metrics = self._rates(trainer, self.window, self.last_step_end - self.window_start)
        metrics |= self.stragglers.compare(trainer, metrics["perf/step_time_s"], metrics["perf/data_wait_fraction"])
        if torch.cuda.is_available():
            metrics["perf/gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.images_per_s = metrics["perf/images_per_s"]  # what the progress bar shows
        self._log(trainer, metrics)
        self.window_start = self.last_step_end
        self.window = {"steps": 0, "images": 0, "wait": 0.0}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.epoch["steps"]:
            return
        train_time = self.last_step_end - self.epoch_start
        rates = self._rates(trainer, self.epoch, train_time)
        epoch_metrics = {
            "perf/epoch_time_s": time.perf_counter() - self.epoch_start,
            # the epoch's training images over its training time (its validation left out), with the epoch it
            # belongs to: one rate per epoch that report.py compares across runs
            "perf/epoch_images_per_s": rates["perf/images_per_s"],
            "epoch": trainer.current_epoch,
        }
        self._log(trainer, epoch_metrics)
        wait = rates["perf/data_wait_fraction"]
        bound = "data-bound: the input pipeline sets the pace" if wait > self.data_bound_fraction else "compute-bound"
        slowest = self.stragglers.describe()
        if trainer.is_global_zero:
            log.info(
                "Epoch %d: %.0f img/s (%.0f per device), %.0f ms per step, %.0f%% of it waiting for data: %s; "
                "training took %.1f s%s",
                trainer.current_epoch,
                rates["perf/images_per_s"],
                rates["perf/images_per_s_per_device"],
                1000 * rates["perf/step_time_s"],
                100 * wait,
                bound,
                train_time,
                f"; {slowest}" if slowest else "",
            )

    @staticmethod
    def _rates(trainer: pl.Trainer, totals: dict, seconds: float) -> dict[str, float]:
        per_device = totals["images"] / seconds
        return {
            "perf/images_per_s": per_device * trainer.world_size,
            "perf/images_per_s_per_device": per_device,
            "perf/data_wait_fraction": min(1.0, totals["wait"] / seconds),
            "perf/step_time_s": seconds / totals["steps"],
        }

    @staticmethod
    def _log(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Straight to the loggers (rank zero only), at this step: every logger gets the same values."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
