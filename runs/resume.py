"""Where a run starts (``ckpt_path``): by default from the newest complete checkpoint in its run folder, so that a
job restarted after any crash (a requeue, a resubmission with ``run_id=``) continues with no flag."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from data.spec import ConfigError
from runs.checkpoints import (
    CHECKPOINTS,
    CheckpointFile,
    CheckpointHeader,
    UnreadableCheckpoint,
    checkpoint_files,
    verify,
)

log = logging.getLogger(__name__)

AUTO, LAST, FRESH = "auto", "last", "fresh"
SUPERSEDED = "superseded"  # where ckpt_path=fresh moves an earlier run's checkpoints


class ResumeError(RuntimeError):
    """The checkpoint asked for cannot be used; the message names the file or folder and what to do."""


def resume_from(ckpt_path: str | None, run_dir: str | Path, *, global_rank: int, wait_s: float = 300) -> str | None:
    """The checkpoint file to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint of any kind (by global step), or a fresh start in a folder without
    one. ``last``: the same, but a folder without one is an error. ``fresh``: start from scratch; the folder's
    checkpoints are first moved (by global rank 0) to ``superseded/<time>/``, so that two runs' top-k files never
    mix and nothing is lost. A file: that checkpoint, which must be this run's (in its folder, or written by its
    ModelCheckpoint), or the folder must hold none.
    Every rank calls this with the same arguments and gets the same answer; only rank 0 logs and moves files.
    """
    run_dir = Path(run_dir)
    says = log.info if global_rank == 0 else log.debug
    if ckpt_path is None:
        allowed = f"{AUTO} (resume if the run folder holds a checkpoint), {LAST}, {FRESH} or a file"
        raise ConfigError("ckpt_path", None, allowed)
    if ckpt_path == FRESH:
        _start_fresh(run_dir, global_rank=global_rank, wait_s=wait_s)
        return None
    if ckpt_path in (AUTO, LAST):
        chosen = _newest_complete(run_dir, global_rank=global_rank)
        if chosen is None and ckpt_path == LAST:
            raise ResumeError(f"ckpt_path=last: {run_dir} holds no checkpoint (ckpt_path=auto starts fresh there)")
        if chosen is None:
            says("No checkpoint in %s: starting fresh", run_dir)
        return chosen
    path = Path(ckpt_path).expanduser().resolve()
    if not path.is_file():
        raise ResumeError(f"ckpt_path={ckpt_path}: no such file")
    own = [checkpoint for checkpoint in checkpoint_files(run_dir) if checkpoint.path.resolve() != path]
    try:
        header = CheckpointHeader.read(path)
        this_run = (run_dir / CHECKPOINTS).resolve() in header.written_to
        if own and not this_run and run_dir.resolve() not in path.parents:
            raise ResumeError(
                f"ckpt_path={ckpt_path} is another run's checkpoint, and this run folder {run_dir} holds {len(own)} "
                f"of its own (e.g. {own[0].path.name}): their top-k files would mix. Start in a new run folder "
                f"(run_id=...), or move them aside first"
            )
        verify(path)
    except UnreadableCheckpoint as error:
        raise ResumeError(f"ckpt_path={ckpt_path} does not load: {error}") from error
    says("Resuming from %s (global step %d, epoch %d)", path, header.global_step, header.epoch)
    return str(path)


def _newest_complete(run_dir: Path, *, global_rank: int) -> str | None:
    """The newest checkpoint by global step that loads; each one that does not is reported by name and skipped."""
    warns = log.warning if global_rank == 0 else log.debug
    ranked: list[tuple[int, int, CheckpointFile, int]] = []
    unreadable: list[str] = []
    for checkpoint in checkpoint_files(run_dir):
        try:
            header = CheckpointHeader.read(checkpoint.path)
        except UnreadableCheckpoint as error:
            warns("Checkpoint %s does not load, skipped: %s", checkpoint.path, error)
            unreadable.append(str(error))
            continue
        ranked.append((header.global_step, checkpoint.path.stat().st_mtime_ns, checkpoint, header.epoch))
    for step, _, checkpoint, epoch in sorted(ranked, key=lambda entry: entry[:2], reverse=True):
        try:
            verify(checkpoint.path)
        except UnreadableCheckpoint as error:
            warns("Checkpoint %s does not load, trying the next newest: %s", checkpoint.path, error)
            unreadable.append(str(error))
            continue
        if global_rank == 0:
            log.info("Resuming from %s (%s, global step %d, epoch %d)", checkpoint.path, checkpoint.kind, step, epoch)
        return str(checkpoint.path)
    if unreadable:
        raise ResumeError(
            f"None of the {len(unreadable)} checkpoints in {run_dir} loads:\n  " + "\n  ".join(unreadable) + "\n"
            f"Resume from another file (ckpt_path=FILE), or start over with ckpt_path={FRESH} (moves them to "
            f"{run_dir / SUPERSEDED})"
        )
    return None


def _start_fresh(run_dir: Path, *, global_rank: int, wait_s: float) -> None:
    found = checkpoint_files(run_dir)
    if not found:
        return
    if global_rank == 0:
        archive = run_dir / SUPERSEDED / time.strftime("%Y-%m-%d_%H-%M-%S")
        for checkpoint in found:
            target = archive / checkpoint.path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.path.replace(target)
        log.warning("ckpt_path=%s: moved the %d checkpoints already in %s to %s", FRESH, len(found), run_dir, archive)
        return
    # Lightning itself resumes a SLURM job from an hpc_ckpt_N.ckpt in the folder: wait until rank 0 moved them
    deadline = time.monotonic() + wait_s
    while checkpoint_files(run_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"ckpt_path={FRESH}: global rank 0 did not move the checkpoints in {run_dir} aside")
        time.sleep(0.2)
