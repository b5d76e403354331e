"""Checkpoint files written atomically: a checkpoint interrupted half-way never replaces a good one.

Lightning's own ``_atomic_save`` stages the file in the system temp folder and then moves it, which is a copy
(not atomic) whenever /tmp is another file system than the run folder, and never fsyncs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write beside the target, fsync, then rename over it (atomic on POSIX file systems)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, path)
        except BaseException as error:
            os.unlink(staging)
            io_error = _os_error_in(error)  # torch.save reports a failed write as a RuntimeError from its zip writer
            if io_error is None:
                raise
            kept = "the previous one is intact" if path.exists() else "none was written"  # a full disk, a quota
            raise OSError(io_error.errno, f"cannot write checkpoint {path} ({io_error.strerror}); {kept}") from error
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)


def _os_error_in(error: BaseException) -> OSError | None:
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error
