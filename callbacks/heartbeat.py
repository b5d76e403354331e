"""Where this rank is in its training loop (phase, step, its loop's innermost frame), in a file per rank under
``<run folder>/heartbeats/`` that every other rank can read: the watchdog of a hung run names the rank the others
wait for, its host and how stale its heartbeat is.

The training loop's hooks only write one attribute of ``PULSE`` per step (its phase and when it began); a
background thread turns them into the file (``HeartbeatWriter``), so a step costs no file write and no device sync.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl

log = logging.getLogger(__name__)

STARTUP = "start-up"  # from setup until the first training step ends: indexing, compilation, the first step
DATA = "waiting for data"  # from a step's end to the next one's start: the loader, and the callbacks between steps
STEP = "forward/backward"  # a training step: forward, backward (with DDP's gradient all-reduce), optimizer
COLLECTIVE = "collective"  # a CPU collective of the callbacks between steps (see ``collective``)
VALIDATION = "validation"
CHECKPOINT = "saving a checkpoint"
FINISHED = "finished"
WATCHED = frozenset({DATA, STEP, COLLECTIVE, VALIDATION, CHECKPOINT})  # all but the start-up and the end


class Pulse:
    """This process's phase and the ``time.monotonic()`` at which it began, as one tuple (``state``): written in one
    attribute store by the training loop's hooks, so that another thread never reads a new phase with an old start."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.state: tuple[str, float] = (STARTUP, time.monotonic())
        self.collective = ""

    def enter(self, phase: str) -> None:
        self.state = (phase, time.monotonic())

    def describe(self) -> str:
        phase = self.state[0]
        return f"{COLLECTIVE} ({self.collective})" if phase == COLLECTIVE else phase


PULSE = Pulse()  # one per process: a rank is one training loop


@contextmanager
def collective(name: str) -> Iterator[None]:
    """Marks a CPU collective between steps in this rank's heartbeat. The phase's clock keeps running from the step's
    end: a gather that never returns is a hang like any other."""
    previous, since = PULSE.state
    PULSE.collective = name
    PULSE.state = (COLLECTIVE, since)
    try:
        yield
    finally:
        PULSE.state = (previous, PULSE.state[1])


def position(frame) -> tuple[str, bool]:
    """Where a thread is (its innermost Python frame; in a torch.distributed call, that call and its caller), and
    whether it is in a torch.distributed call. On a GPU, NCCL's waits show at the next synchronisation instead."""
    stack = traceback.extract_stack(frame)
    distributed = [i for i, entry in enumerate(stack) if f"torch{os.sep}distributed{os.sep}" in entry.filename]
    innermost = stack[-1]
    where = f"{innermost.name} ({Path(innermost.filename).name}:{innermost.lineno})"
    if distributed and distributed[0] > 0:
        caller = stack[distributed[0] - 1]
        where += f" from {caller.name} ({Path(caller.filename).name}:{caller.lineno})"
    return where, bool(distributed)


def heartbeat_folder(trainer: pl.Trainer) -> Path:
    return Path(trainer.default_root_dir) / "heartbeats"


def read_heartbeats(folder: Path, world_size: int) -> dict[int, dict | None]:
    """Every rank's last heartbeat (None: no readable file)."""
    beats: dict[int, dict | None] = {}
    for rank in range(world_size):
        try:
            beats[rank] = json.loads((folder / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            beats[rank] = None
    return beats


class HeartbeatWriter(threading.Thread):
    """Writes this rank's heartbeat every ``interval_s`` seconds and when woken (``beat_now``, at the phase changes
    that matter), atomically (a reader never sees half a file). A thread of its own: a file system that blocks a
    write does not stop the watchdog's clock."""

    def __init__(self, trainer: pl.Trainer, interval_s: float) -> None:
        super().__init__(name="heartbeat-writer", daemon=True)
        self.trainer, self.interval_s = trainer, interval_s
        self.folder = heartbeat_folder(trainer)
        self.path = self.folder / f"rank{trainer.global_rank}.json"
        self.identity = {"rank": trainer.global_rank, "host": socket.gethostname(), "pid": os.getpid()}
        self.loop_thread = threading.get_ident()  # the training loop's, which builds this writer
        self._wake, self._stopping, self._failed = threading.Event(), False, False

    def beat_now(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Ends the thread after one last heartbeat (its phase as the hooks left it, ``FINISHED`` at the end)."""
        self._stopping = True
        self._wake.set()
        self.join(timeout=2 * self.interval_s)

    def run(self) -> None:
        while True:
            stopping = self._stopping  # read before the write: a stop during it gets one more, with the last phase
            try:
                self.write()
            except OSError as error:  # a full or vanished disk: the other ranks will see this one as silent
                if not self._failed:
                    log.warning("Could not write the heartbeat %s (tried again every beat): %s", self.path, error)
                self._failed = True
            if stopping:
                return
            self._wake.wait(self.interval_s)
            self._wake.clear()

    def write(self) -> None:
        frame = sys._current_frames().get(self.loop_thread)
        where, in_distributed = position(frame) if frame is not None else ("", False)
        record = {
            **self.identity,
            "step": self.trainer.global_step,
            "phase": PULSE.describe(),
            "phase_s": round(time.monotonic() - PULSE.state[1], 3),
            "where": where,
            "in_distributed": in_distributed,
            "time": time.time(),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.path)
