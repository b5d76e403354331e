"""Checkpoints in mid-epoch, every rank at one step: every N minutes, and when the job is told to stop (then it
requeues itself on SLURM). Both resume exactly, loaders' state included."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from callbacks.cpu_group import cpu_group
from callbacks.finite_loss import require_finite
from callbacks.heartbeat import collective
from compat import hpc_checkpoint_path, skip_per_step_sigterm_broadcast
from loggers import wandb_logger
from runs.checkpoints import CHECKPOINTS, TIMED_NAME, prune
from runs.restart_marker import restart_would_not_help
from slurm.environment import slurm_job_id

log = logging.getLogger(__name__)

SAVE, STOP, REQUEUE = 1, 2, 3  # what a rank asks for; the ranks agree on the strongest


class MidEpochCheckpoint(pl.Callback):
    """Every ``every_minutes`` a time-based checkpoint ``checkpoints/timed-stepN.ckpt``; on the requeue signal
    (sbatch ``--signal=USR1@T``, preemption) or SIGTERM (scancel, node drain) Lightning's ``hpc_ckpt_N.ckpt``, after
    which the run stops, and on the requeue signal a SLURM job requeues itself. ``ckpt_path=auto`` resumes from the
    newest of these and the epoch-end ones.

    Written by hand because Lightning's own handler saves inside the signal handler, where each DDP rank is at a
    different point of its step: the checkpoint's collectives (barrier, the DALI readers' state) then pair with the
    wrong peers. Here a signal or a rank's clock only records a request; the ranks agree on it every
    ``check_every_n_steps`` training batches, and at the end of each epoch (after its validation), with a CPU
    all-reduce (no GPU synchronisation) and save at that step boundary together. Retention (runs/checkpoints.py):
    the newest ``keep_time_based`` time-based checkpoints and the newest preemption one, beside ModelCheckpoint's
    top-k and last; the disk this takes is logged after the first step.
    """

    def __init__(
        self,
        requeue_signal: str = "SIGUSR1",
        check_every_n_steps: int = 5,
        every_minutes: float | None = 30,
        keep_time_based: int = 2,
        top_k: int = 0,
    ) -> None:
        self.requeue_signal = signal.Signals[requeue_signal]
        self.check_every_n_steps = check_every_n_steps
        self.every_s = every_minutes * 60 if every_minutes else None
        self.keep_time_based = keep_time_based
        self.top_k = top_k  # ModelCheckpoint's save_top_k: only for the disk budget
        self._signalled = 0
        self._batches = 0
        self._due = float("inf")
        self._group = None
        self._previous_handlers: dict[signal.Signals, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Replaces the handlers Lightning registered before this hook (its SLURM requeue handler, and its SIGTERM
        # handler, which broadcasts from inside the handler): one owner of both signals.
        for signum in (self.requeue_signal, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._record)
        skip_per_step_sigterm_broadcast(trainer)  # its flag is never set now: a sync per step for nothing
        self._group = cpu_group() if trainer.world_size > 1 else None
        self._batches = 0
        self._restart_clock()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == 1 and trainer.is_global_zero:
            self._log_disk_budget(trainer, pl_module)
        # Lightning 2.6.6 resumes a checkpoint saved after an epoch's last batch, or at its validation's end, as if
        # one more epoch had ended: a request there waits for the epoch's end, where ModelCheckpoint saves too
        if self._batches % self.check_every_n_steps or batch_idx + 1 >= trainer.num_training_batches:
            return
        self._act_on_requests(trainer, pl_module, outputs["loss"])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._act_on_requests(trainer, pl_module, None)

    def _act_on_requests(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor | None) -> None:
        request = self._agreed(max(self._signalled, SAVE if time.monotonic() >= self._due else 0))
        if not request:
            return
        require_finite(trainer, pl_module, "a mid-epoch checkpoint", loss=loss, weights=True)
        if request == SAVE:
            timed = TIMED_NAME.format(step=trainer.global_step)
            self._save(trainer, Path(trainer.default_root_dir, CHECKPOINTS, timed))
            self._restart_clock()
            return
        path = self._save(trainer, Path(hpc_checkpoint_path(trainer.default_root_dir)))
        for logger in trainer.loggers:
            logger.save()
        wandb_logger.finish(trainer)  # flushed to disk now: a requeue signals W&B's service process too
        if trainer.is_global_zero:
            restart_would_not_help()  # the batch script must not requeue it again, nor a job told to end
        job_id = slurm_job_id()
        if request == REQUEUE and job_id and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
            if result.returncode:
                log.error("scontrol requeue %s failed: %s", job_id, result.stderr.strip())
            else:
                log.info("Requeued SLURM job %s: it resumes from %s", job_id, path)
        elif trainer.is_global_zero:
            log.info("Stopping; resume with ckpt_path=%s", path)
        trainer.strategy.barrier("preemption")
        raise SystemExit(128 + (self.requeue_signal if request == REQUEUE else signal.SIGTERM))

    def _save(self, trainer: pl.Trainer, path: Path) -> Path:
        trainer.save_checkpoint(path, weights_only=False)  # all of it, atomically (plugins/checkpoint_io.py)
        if trainer.is_global_zero:
            removed = prune(trainer.default_root_dir, keep_time_based=self.keep_time_based)
            log.info(
                "Saved %s at step %d (epoch %d)%s",
                path,
                trainer.global_step,
                trainer.current_epoch,
                f"; removed {', '.join(p.name for p in removed)}" if removed else "",
            )
        return path

    def _log_disk_budget(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the first step, when the optimizer's state exists: what one checkpoint and the kept set weigh."""
        states = [pl_module.state_dict(), *(optimizer.state_dict() for optimizer in trainer.optimizers)]
        size = sum(_tensor_bytes(state) for state in states)
        kept = self.top_k + 1 + (self.keep_time_based if self.every_s else 0) + 1  # top-k, last, time-based, hpc
        free = shutil.disk_usage(trainer.default_root_dir).free
        every = f"every {self.every_s / 60:g} min, newest {self.keep_time_based} kept" if self.every_s else "off"
        says = log.warning if kept * size > free else log.info
        says(
            "Checkpoints: about %.0f MB each; the run folder keeps at most %d (top-%d, last, time-based %s, "
            "preemption 1): about %.2f GB, with %.1f GB free there",
            size / 2**20, kept, self.top_k, every, kept * size / 2**30, free / 2**30,
        )  # fmt: skip

    def _restart_clock(self) -> None:
        self._due = time.monotonic() + self.every_s if self.every_s else float("inf")

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = max(self._signalled, REQUEUE if signum == self.requeue_signal else STOP)
        log.info("Received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)

    def _agreed(self, request: int) -> int:
        """The strongest request of any rank, the same on every rank."""
        if self._group is None:
            return request
        request = torch.tensor([request])
        with collective("checkpoint agreement"):
            dist.all_reduce(request, op=dist.ReduceOp.MAX, group=self._group)
        return int(request)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()


def _tensor_bytes(state: object) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(value) for value in state)
    return 0
