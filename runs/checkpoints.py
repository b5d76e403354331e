"""The checkpoints a run folder holds, by kind, and whether one is complete: what resume and retention both read."""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

HPC, LAST, TIMED, TOP_K = "preemption", "last", "time-based", "top-k"
CHECKPOINTS = "checkpoints"  # ModelCheckpoint's folder in the run folder (conf/callbacks/default.yaml)
TIMED_NAME = "timed-step{step:09d}.ckpt"
_TIMED = re.compile(r"timed-step(\d+)\.ckpt")
_HPC = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is truncated, corrupt or not a checkpoint; the message names the file."""


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    kind: str

    @property
    def order(self) -> int:
        """Age within its kind, from its name where the name has one (hpc_ckpt_N, timed-stepN), else its mtime."""
        for pattern in (_HPC, _TIMED):
            if match := pattern.fullmatch(self.path.name):
                return int(match[1])
        return int(self.path.stat().st_mtime_ns)


def checkpoint_files(run_dir: str | os.PathLike) -> list[CheckpointFile]:
    """Every checkpoint of the run: Lightning's ``hpc_ckpt_N.ckpt`` in the folder, ``last``, top-k and time-based
    ones in ``checkpoints/``; files staged by an interrupted write (hidden ``.*.partial``) are not checkpoints."""
    run_dir = Path(run_dir)
    found = [CheckpointFile(path, HPC) for path in run_dir.glob("hpc_ckpt_*.ckpt") if _HPC.fullmatch(path.name)]
    for path in (run_dir / CHECKPOINTS).glob("*.ckpt"):
        if path.name.startswith("."):
            continue
        kind = TIMED if _TIMED.fullmatch(path.name) else LAST if path.name.startswith("last") else TOP_K
        found.append(CheckpointFile(path, kind))
    return sorted(found, key=lambda checkpoint: str(checkpoint.path))


@dataclass(frozen=True)
class CheckpointHeader:
    """What resume needs of a checkpoint, read from its pickle alone (its tensors are mapped, not read): progress,
    and the folders its ModelCheckpoint callbacks wrote to (their state keeps ``dirpath``), i.e. whose run it is."""

    global_step: int
    epoch: int
    written_to: frozenset[Path]

    @classmethod
    def read(cls, path: Path) -> CheckpointHeader:
        """A file cut short has no zip directory and fails here, as UnreadableCheckpoint naming it."""
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            step, epoch = int(state["global_step"]), int(state["epoch"])
        except Exception as error:  # torch reports a truncated or foreign file in several ways
            raise UnreadableCheckpoint(f"{path}: {_first_line(error)}") from error
        folders = frozenset(
            Path(value["dirpath"]).resolve()
            for key, value in state.get("callbacks", {}).items()
            if key.startswith("ModelCheckpoint") and isinstance(value, dict) and value.get("dirpath")
        )
        return cls(step, epoch, folders)


def verify(path: Path) -> None:
    """Reads every member and checks its CRC-32: torch.load itself does not, and loads flipped bytes silently."""
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        raise UnreadableCheckpoint(f"{path}: {_first_line(error)}") from error
    if failed:
        raise UnreadableCheckpoint(f"{path}: {failed} does not match its CRC-32 (the file is corrupt)")


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def prune(run_dir: str | os.PathLike, *, keep_time_based: int) -> list[Path]:
    """The retention rule beside ModelCheckpoint's own (top-k by val top-1, and last): the newest ``keep_time_based``
    time-based checkpoints and the newest preemption one stay; older ones of those two kinds are deleted."""
    removed = []
    files = checkpoint_files(run_dir)
    for kind, keep in ((TIMED, keep_time_based), (HPC, 1)):
        newest_first = sorted((file for file in files if file.kind == kind), key=lambda f: f.order, reverse=True)
        for file in newest_first[keep:]:
            file.path.unlink(missing_ok=True)
            removed.append(file.path)
    return removed
