"""Every private API of Lightning, Hydra, rich and torch this project uses, in one place: upgrading one means reading
this file against the new version. ``WRITTEN_FOR`` names the versions it was checked against; tests/test_compat.py
fails, saying so, on any other.

Each function says what it reads and why no public API gives it.
"""

from __future__ import annotations

import os
from typing import Any, ContextManager

import pytorch_lightning as pl
from hydra.core.utils import JobReturn
from pytorch_lightning.callbacks import RichProgressBar
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from pytorch_lightning.trainer.connectors.checkpoint_connector import _CheckpointConnector

WRITTEN_FOR = {"pytorch-lightning": "2.6.6", "hydra-core": "1.3.8", "rich": "15.0.0", "torch": "2.14.1"}

__all__ = [
    "WRITTEN_FOR",
    "UnrepeatedDistributedSampler",
    "advance_rich_bar",
    "dynamo_compilations",
    "hpc_checkpoint_path",
    "refresh_rich_bar_metrics",
    "rich_bar_render_lock",
    "skip_per_step_sigterm_broadcast",
    "job_error",
    "launches_its_ranks_by_rerunning_the_script",
    "trained_batches_in_epoch",
]


def trained_batches_in_epoch(trainer: pl.Trainer) -> int:
    """Batches of the current epoch already trained, as the fit loop restored them from a checkpoint: what a loader
    that resumes in mid-epoch must skip (the loop's progress counters are not public)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def dynamo_compilations() -> list[dict]:
    """Each frame TorchDynamo compiled in this process (its last 64), oldest first: the compile id (``frame/n``: the
    n-th compilation of that frame), the function, the guard that failed and made it compile again (None the first
    time), the frame's compile seconds (a training graph's backward compiles later, at its first backward) and its
    failure (None: it compiled). torch has no public count of compilations: these are the records of
    ``torch._dynamo.utils.get_compilation_metrics`` (read in torch 2.14.1), less those of the backward graphs, which
    name no function."""
    from torch._dynamo.utils import get_compilation_metrics  # imports dynamo: only when asked

    return [
        {
            "id": record.compile_id,
            "function": record.co_name,
            "recompile_reason": record.recompile_reason,
            "seconds": record.entire_frame_compile_time_s,
            "failure": record.fail_type,
        }
        for record in get_compilation_metrics()
        if record.co_name is not None
    ]


def hpc_checkpoint_path(folder: str | os.PathLike) -> str:
    """The next ``hpc_ckpt_N.ckpt`` in ``folder``: the file Lightning resumes a SLURM job from without a flag."""
    return _CheckpointConnector.hpc_save_path(str(folder))


def skip_per_step_sigterm_broadcast(trainer: pl.Trainer) -> None:
    """Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every DDP training step, on the root device, and
    reads it back (``.item()``): a device synchronisation and a collective per step. Where the project owns SIGTERM
    (callbacks/mid_epoch_checkpoint.py replaces Lightning's handler, so the flag is never set) it is skipped."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def launches_its_ranks_by_rerunning_the_script(trainer: pl.Trainer) -> bool:
    """Whether Lightning starts this run's other ranks itself by running ``sys.argv`` again (its DDP subprocess
    launcher), which a Hydra multirun cannot survive; not when a cluster (srun, torchrun) starts them."""
    launcher = trainer.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    )


def job_error(job_return: JobReturn) -> BaseException | Any:
    """The exception a failed Hydra job raised (``JobReturn.return_value`` re-raises it instead of returning it)."""
    return job_return._return_value


def advance_rich_bar(bar: RichProgressBar, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: int) -> None:
    """Moves Lightning's rich training bar to ``batches`` without reading the metrics (its own hook reads them,
    a device synchronisation, at every step); creates the bar first in a run resumed in mid-epoch."""
    if bar.train_progress_bar_id is None:
        bar._initialize_train_progress_bar_id()
    bar._update(bar.train_progress_bar_id, batches)


def refresh_rich_bar_metrics(bar: RichProgressBar, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Reads the logged metrics into the rich bar (on the steps that log anyway)."""
    bar._update_metrics(trainer, pl_module)


def rich_bar_render_lock(bar: RichProgressBar) -> ContextManager:
    """rich's lock on the live display's render (``Live._lock``), which Lightning's refresh thread takes to redraw
    the bar. Held while a log line is printed above the bar: otherwise that thread can redraw the bar (taller, once
    the metrics wrap) between the print's cursor reset and its output, and the reset, sized for the old bar, leaves
    the new bar's first line behind (a second copy of the last bar: 1 run in 5 to 13 on 2 busy cores, none in 25
    with the lock)."""
    return bar.progress.live._lock
