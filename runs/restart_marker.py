"""What a SLURM batch script needs to know of a failed run: whether a restart may help (slurm/requeue_on_crash.sh).

The script names a file on its own host in ``IMAGENET_PIPELINE_PROGRESS_FILE``; global rank 0 (on that host)
creates it once it has trained a step, and removes it when the run ended on purpose or on an error a restart would
repeat. Failed tasks with the file present crashed during training: the job is requeued.
"""

from __future__ import annotations

import os
from pathlib import Path

PROGRESS_FILE_ENV = "IMAGENET_PIPELINE_PROGRESS_FILE"


def training_began() -> None:
    if path := os.environ.get(PROGRESS_FILE_ENV):
        Path(path).touch()


def restart_would_not_help() -> None:
    """A stop on a signal (the run saved and requeued itself, or was told to end) or a diverged run."""
    if path := os.environ.get(PROGRESS_FILE_ENV):
        Path(path).unlink(missing_ok=True)
