"""A rank whose training stops making progress writes where every thread of it is and where every rank is, then
exits, instead of hanging until the collective timeout (which says nothing of where) or the job's time limit."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl

from callbacks.heartbeat import (
    CHECKPOINT,
    DATA,
    FINISHED,
    PULSE,
    STARTUP,
    STEP,
    VALIDATION,
    WATCHED,
    HeartbeatWriter,
    heartbeat_folder,
    read_heartbeats,
)
from data.spec import ConfigError
from runs.restart_marker import PROGRESS_FILE_ENV, training_began

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): the run hung; a requeued job may well get past it
HEARTBEAT_S = 5.0  # the heartbeat's and the watchdog's period (a quarter of the limit where that is shorter)
SILENT_AFTER_BEATS = 3  # a heartbeat older than this many periods: the rank is stopped, dead or frozen
READ_HEARTBEATS_S = 10.0  # how long the report waits for the heartbeat folder (a stuck network file system)


class HangWatchdog(pl.Callback):
    """When no training step (or, in validation, no validation batch) begins or ends for ``minutes``, the watchdog
    thread of the rank logs every thread's
    stack of its process and every rank's heartbeat (``callbacks/heartbeat.py``: a stopped rank cannot report itself,
    the others name it, its host and how old its heartbeat is), flushes the log and exits with ``HANG_EXIT_CODE``.
    The launching process (Lightning's launcher) first gives the ranks it started a moment to report themselves,
    then kills them.

    Armed from the end of the first training step to the end of training (``heartbeat.WATCHED``):

    - start-up: disarmed from setup until this process's first training step ends (indexing, the sanity validation,
      the loader's first batches, torch.compile's compilation and the first step; their limits are
      ``data.index_wait_s`` and the collective timeout);
    - validation: its clock restarts at every validation batch's end, so a validation that waits longer than the
      limit for one batch (a rank stopped there, a collective of the metrics' sync) fires it, and a long one does
      not; the sanity check before the first step belongs to the start-up;
    - checkpoint saving: the clock restarts at ``on_save_checkpoint`` (a save, its barrier included, gets the whole
      limit; Lightning has no hook after a save, and the next step, validation batch or epoch restarts it again);
    - training: the clock restarts at every step's start and end, so a step, or a wait for data and the callbacks
      between steps, longer than the limit fires it;
    - the end: disarmed from ``on_train_end``.

    ``collective_timeout`` is the process group's (``trainer.strategy.timeout``): it must be longer than the limit,
    or a hung collective ends the run with an exception that says nothing of where the ranks are. None: none is
    configured, nothing to check.

    Also, where ``IMAGENET_PIPELINE_PROGRESS_FILE`` is set, global rank 0 touches that file once, when the first
    training step of this process ends: the sbatch template requeues a job that crashed during training and not
    one that failed at start-up.
    """

    def __init__(self, minutes: float = 15, collective_timeout: timedelta | None = None) -> None:
        if collective_timeout is not None and collective_timeout <= timedelta(minutes=minutes):
            raise ConfigError(
                "trainer.strategy.timeout",
                str(collective_timeout),
                f"longer than callbacks.watchdog.minutes={minutes}, so that the watchdog reports a hung collective "
                "before the process group's timeout ends the run",
            )
        self.minutes = minutes
        self.limit_s = 60.0 * minutes
        self.period_s = min(HEARTBEAT_S, self.limit_s / 4)
        self._writer: HeartbeatWriter | None = None
        self._stopped = threading.Event()
        self._trained = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        PULSE.reset()
        self._trained = False
        self._stopped.clear()
        self._writer = HeartbeatWriter(trainer, self.period_s)
        self._writer.start()
        threading.Thread(target=self._watch, args=(trainer,), name="hang-watchdog", daemon=True).start()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(DATA if self._trained else STARTUP)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        PULSE.state = (STEP, time.monotonic())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        PULSE.state = (DATA, time.monotonic())
        if not self._trained:
            self._first_step_ended(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(VALIDATION if self._trained else STARTUP)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._trained:
            PULSE.state = (VALIDATION, time.monotonic())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(DATA if self._trained else STARTUP)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._enter(CHECKPOINT)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._enter(FINISHED)  # what follows (the loggers' last writes, the teardown) is not a training step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()

    def _enter(self, phase: str) -> None:
        """A phase change worth a heartbeat at once (never per step)."""
        PULSE.enter(phase)
        self._beat_now()

    def _beat_now(self) -> None:
        if self._writer is not None:
            self._writer.beat_now()

    def _stop(self) -> None:
        self._stopped.set()
        if self._writer is not None:
            PULSE.enter(FINISHED)
            self._writer.stop()
            self._writer = None

    def _first_step_ended(self, trainer: pl.Trainer) -> None:
        self._trained = True
        self._beat_now()
        if trainer.is_global_zero:
            try:
                training_began()  # a crash from now on is worth a restart (slurm/requeue_on_crash.sh)
            except OSError as error:
                log.warning("Could not touch %s: %s", PROGRESS_FILE_ENV, error)

    def _watch(self, trainer: pl.Trainer) -> None:
        while not self._stopped.wait(self.period_s):
            phase, since = PULSE.state
            idle_s = time.monotonic() - since
            if self._trained and phase in WATCHED and idle_s > self.limit_s:
                self._report_and_exit(trainer, idle_s)

    def _report_and_exit(self, trainer: pl.Trainer, idle_s: float) -> None:
        log.critical(
            "Hang watchdog: rank %d on %s (pid %d) has had no training step (or validation batch) begin or end for "
            "%.0f s "
            "(callbacks.watchdog.minutes=%g), in phase '%s' after step %d; every thread's stack and every rank's "
            "heartbeat follow, then the process exits with code %d (HANG_EXIT_CODE)\n%s",
            trainer.global_rank,
            socket.gethostname(),
            os.getpid(),
            idle_s,
            self.minutes,
            PULSE.describe(),
            trainer.global_step,
            HANG_EXIT_CODE,
            thread_stacks(),
        )
        _flush_logs()
        folder = heartbeat_folder(trainer)
        beats = _read_within(folder, trainer.world_size, READ_HEARTBEATS_S)
        if beats is None:
            log.critical("Hang watchdog: %s could not be read within %.0f s", folder, READ_HEARTBEATS_S)
        else:
            silent_after_s = SILENT_AFTER_BEATS * self.period_s + 1.0
            log.critical("Hang watchdog: heartbeats in %s\n%s", folder, heartbeat_report(beats, silent_after_s))
        _flush_logs()
        _end_launched_ranks(trainer, grace_s=min(30.0, self.limit_s / 2))
        log.critical("Hang watchdog: rank %d exits with code %d", trainer.global_rank, HANG_EXIT_CODE)
        _flush_logs()
        os._exit(HANG_EXIT_CODE)


def thread_stacks() -> str:
    """Every thread's stack in this process, named, most recent call last."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    return "\n".join(
        f"Thread '{names.get(ident, '?')}' ({ident}), most recent call last:\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


def waits_for_others(beat: dict) -> bool:
    """In a torch.distributed call, or inside the step, where DDP's gradient all-reduce waits (in C++, with no
    Python frame of torch.distributed)."""
    return beat["in_distributed"] or beat["phase"] == STEP


def heartbeat_report(beats: dict[int, dict | None], silent_after_s: float, now: float | None = None) -> str:
    """A line per rank, then which ranks stand out: silent (a stale heartbeat: stopped, dead or frozen), missing,
    behind (a live rank at an earlier step), or not waiting for the others while they wait (the rank they wait
    for)."""
    now = time.time() if now is None else now
    lines, findings, live = [], [], {}
    for rank, beat in beats.items():
        if beat is None:
            lines.append(f"  rank {rank}: no heartbeat file")
            findings.append(f"rank {rank} wrote no heartbeat: it never reached training")
            continue
        age = now - beat["time"]
        lines.append(
            f"  rank {rank} on {beat['host']} (pid {beat['pid']}): step {beat['step']}, {beat['phase']} for "
            f"{beat['phase_s'] + age:.0f} s, in {beat['where']}; heartbeat {age:.1f} s old"
        )
        if age > silent_after_s:
            findings.append(
                f"rank {rank} on {beat['host']} (pid {beat['pid']}) is silent: its heartbeat is {age:.0f} s old: the "
                f"process is stopped, dead or frozen and cannot report itself; it was at step {beat['step']}, "
                f"{beat['phase']}, in {beat['where']}"
            )
        else:
            live[rank] = beat
    furthest = max((beat["step"] for beat in beats.values() if beat is not None), default=0)
    findings += [
        f"rank {rank} on {beat['host']} is behind: step {beat['step']}, the furthest rank is at step {furthest}"
        for rank, beat in live.items()
        if beat["step"] < furthest
    ]
    waiting = [rank for rank, beat in live.items() if waits_for_others(beat)]
    if waiting:
        findings += [
            f"rank {rank} on {beat['host']} (pid {beat['pid']}) is not waiting for the others ({beat['phase']}, in "
            f"{beat['where']}) while rank(s) {waiting} wait for it"
            for rank, beat in live.items()
            if rank not in waiting and beat["step"] == furthest
        ]
    if not findings:
        findings.append("no rank stands out: look for a frame every rank's stack shares (a collective all wait in)")
    return "\n".join(lines + findings)


def _read_within(folder: Path, world_size: int, seconds: float) -> dict[int, dict | None] | None:
    """The heartbeats, or None if the folder could not be read within ``seconds``."""
    result: list[dict[int, dict | None]] = []
    reader = threading.Thread(target=lambda: result.append(read_heartbeats(folder, world_size)), daemon=True)
    reader.start()
    reader.join(seconds)
    return result[0] if result else None


def _end_launched_ranks(trainer: pl.Trainer, grace_s: float) -> None:
    """The ranks this process started (Lightning's launcher; none under srun or torchrun): ``grace_s`` to report
    themselves (their watchdogs run on the same clock), then killed, as Lightning does when a rank it started fails."""
    children: list[subprocess.Popen] = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.critical("Hang watchdog: killing pid %d, a rank this process started", child.pid)
            child.send_signal(signal.SIGKILL)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
