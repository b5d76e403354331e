"""Save a resumable checkpoint when the job is told to stop, and requeue it on SLURM."""

from __future__ import annotations

import logging
import signal
import subprocess
from types import FrameType

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from callbacks.cpu_group import cpu_group
from compat import hpc_checkpoint_path
from loggers import wandb_logger
from slurm.environment import slurm_job_id

log = logging.getLogger(__name__)

STOP, REQUEUE = 1, 2


class PreemptionCheckpoint(pl.Callback):
    """On the requeue signal (sbatch ``--signal=USR1@T``, preemption) or SIGTERM (scancel, node drain), every rank
    stops at the same step, the checkpoint is saved, and on the requeue signal a SLURM job requeues itself.

    The checkpoint is Lightning's ``hpc_ckpt_N.ckpt`` in the run folder: a job restarted with the same run folder
    (a requeued SLURM job, whose folder is keyed by its job id) resumes from it with no flag. Written by hand
    because Lightning's own handler saves inside the signal handler, where each DDP rank is at a different point of
    its step: the checkpoint's collectives (barrier, the DALI readers' state) then pair with the wrong peers. Here
    the handler only records the request; the ranks agree on it every ``check_every_n_steps`` training batches with
    a CPU all-reduce (no GPU synchronisation) and stop together at that step boundary.
    """

    def __init__(self, requeue_signal: str = "SIGUSR1", check_every_n_steps: int = 5) -> None:
        self.requeue_signal = signal.Signals[requeue_signal]
        self.check_every_n_steps = check_every_n_steps
        self._request = 0
        self._batches = 0
        self._group = None
        self._previous_handlers: dict[signal.Signals, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Replaces the handlers Lightning registered before this hook (its SLURM requeue handler, and its SIGTERM
        # handler, which broadcasts from inside the handler): one owner of both signals.
        for signum in (self.requeue_signal, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._record)
        self._group = cpu_group() if trainer.world_size > 1 else None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches % self.check_every_n_steps:
            return
        request = self._agreed_request()
        if not request:
            return
        path = hpc_checkpoint_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        log.info("Saved %s at step %d (epoch %d)", path, trainer.global_step, trainer.current_epoch)
        for logger in trainer.loggers:
            logger.save()
        wandb_logger.finish(trainer)  # flushed to disk now: a requeue signals W&B's service process too
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

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._request = max(self._request, REQUEUE if signum == self.requeue_signal else STOP)
        log.info("Received %s: saving a checkpoint at the next step boundary", signal.Signals(signum).name)

    def _agreed_request(self) -> int:
        """The strongest request of any rank, the same on every rank."""
        if self._group is None:
            return self._request
        request = torch.tensor([self._request])
        dist.all_reduce(request, op=dist.ReduceOp.MAX, group=self._group)
        return int(request)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
