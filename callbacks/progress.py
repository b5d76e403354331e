"""Progress: a rich bar on a terminal, plain periodic lines in files (SLURM logs); rank zero only."""

from __future__ import annotations

import datetime
import io
import logging
import sys
import time
from typing import TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ProgressBar, RichProgressBar
from rich.text import Text

from callbacks.throughput import ThroughputMonitor
from compat import advance_rich_bar, refresh_rich_bar_metrics, rich_bar_render_lock

log = logging.getLogger(__name__)


def progress_bar(enabled: bool = True, refresh_every_n_steps: int = 50) -> ProgressBar | None:
    """The bar for where the output goes, or None when ``trainer.enable_progress_bar`` is off. Either reads the
    logged metrics (a device synchronisation) only when it redraws, every ``refresh_every_n_steps`` steps."""
    if not enabled:
        return None
    if sys.stdout.isatty():
        return SparseRichProgressBar(metrics_every_n_steps=refresh_every_n_steps)
    return ProgressLines(every_n_steps=refresh_every_n_steps)


def shown_metrics(metrics: dict, trainer: pl.Trainer) -> dict:
    """What a bar shows: Lightning's metrics without ``v_num`` (the logger's version, which the run folder already
    says), then the step's loss and the throughput."""
    return {**{name: value for name, value in metrics.items() if name != "v_num"}, **step_metrics(trainer)}


def step_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last step's loss and the throughput, read here (not logged to the bar, which Lightning would convert
    after every batch): a host read of the loss only when a bar redraws."""
    shown = {}
    if "train/loss" in trainer.callback_metrics:
        shown["loss"] = float(trainer.callback_metrics["train/loss"])
    throughput = next((c for c in trainer.callbacks if isinstance(c, ThroughputMonitor)), None)
    if throughput is not None and throughput.images_per_s is not None:
        shown["img/s"] = throughput.images_per_s
    return shown


class AboveTheBar(io.TextIOBase):
    """The stream of a log handler that writes to the terminal: while the bar is live, each record is printed by
    the bar's console, above the bar (rich redraws the bar below it); otherwise it goes to the terminal as before.
    Written straight to the terminal, a record lands in the middle of the bar's line and leaves a stale copy of
    the bar behind."""

    def __init__(self, bar: RichProgressBar, terminal: TextIO) -> None:
        self.bar, self.terminal = bar, terminal

    def write(self, text: str) -> int:
        progress = self.bar.progress
        if progress is not None and progress.live.is_started:
            with rich_bar_render_lock(self.bar):  # no redraw by Lightning's refresh thread in mid-print
                progress.console.print(Text.from_ansi(text.removesuffix("\n")), soft_wrap=True)
        else:
            self.terminal.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()

    def isatty(self) -> bool:
        return self.terminal.isatty()


def terminal_log_handlers() -> list[logging.StreamHandler]:
    """The handlers that write log records to a terminal (Hydra's console handler, Lightning's own), not files."""
    named = [logger for logger in logging.Logger.manager.loggerDict.values() if isinstance(logger, logging.Logger)]
    return [
        handler
        for logger in [logging.getLogger(), *named]
        for handler in logger.handlers
        if isinstance(handler, logging.StreamHandler)
        and not isinstance(handler.stream, AboveTheBar)
        and getattr(handler.stream, "isatty", lambda: False)()
    ]


class SparseRichProgressBar(RichProgressBar):
    """Lightning's rich bar (epoch, step, ETA, loss, img/s): it moves every step, and reads the metrics every
    ``metrics_every_n_steps`` steps only (Lightning's reads them at every step). Log records go above it."""

    def __init__(self, metrics_every_n_steps: int = 50) -> None:
        super().__init__()
        self.metrics_every_n_steps = metrics_every_n_steps
        self.rerouted: dict[logging.StreamHandler, TextIO] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.is_enabled:
            for handler in terminal_log_handlers():
                self.rerouted[handler] = handler.setStream(AboveTheBar(self, handler.stream))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.restore_log_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.restore_log_handlers()

    def restore_log_handlers(self) -> None:
        for handler, terminal in self.rerouted.items():
            handler.setStream(terminal)
        self.rerouted.clear()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        if self.is_disabled:
            return
        advance_rich_bar(self, trainer, pl_module, batch_idx + 1)
        if trainer.global_step % self.metrics_every_n_steps == 0:  # the steps Lightning logs at
            refresh_rich_bar_metrics(self, trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return shown_metrics(super().get_metrics(trainer, pl_module), trainer)


class ProgressLines(ProgressBar):
    """One line every ``every_n_steps`` optimizer steps (the steps Lightning logs at): epoch, step in the epoch,
    percent, loss, img/s and the epoch's ETA."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed in mid-epoch gets no epoch start

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch_start, self.first_batch = time.perf_counter(), None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self.first_batch = batch_idx if self.first_batch is None else self.first_batch  # a resumed epoch starts late
        done = batch_idx + 1
        if not self._enabled or trainer.global_step % self.every_n_steps or not trainer.is_global_zero:
            return
        total = self.total_train_batches
        seconds = time.perf_counter() - self.epoch_start
        eta = seconds / (done - self.first_batch) * (total - done) if isinstance(total, int) else float("nan")
        metrics = shown_metrics(self.get_metrics(trainer, pl_module), trainer)
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        eta_text = str(datetime.timedelta(seconds=round(eta))) if eta == eta else "?"
        log.info(
            f"epoch {trainer.current_epoch} step {done}/{total} ({done / total:.0%}) {shown} eta {eta_text}"
            if isinstance(total, int)
            else f"epoch {trainer.current_epoch} step {done} {shown}"
        )
