"""The SLURM job as Lightning sees it, checked against the Trainer before any process group is formed."""

from __future__ import annotations

import logging
import os
import socket

from lightning_fabric.plugins.environments import SLURMEnvironment

log = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The job's id as ``scontrol`` takes it (``ARRAYJOB_TASK`` for an array task); None outside SLURM."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmLayoutError(RuntimeError):
    """The job's tasks do not match the Trainer's devices and nodes; the message names the sbatch option to change."""


class SlurmJob(SLURMEnvironment):
    """Lightning's SLURM environment (ranks, addresses and ports from srun's variables) with two changes.

    Its checks say which sbatch option to change and also catch a job started without srun (which would otherwise
    wait forever at "Initializing distributed"); and it does not requeue itself: ``callbacks.mid_epoch_checkpoint``
    owns the requeue signal, so that the checkpoint is saved at the same step on every rank.
    """

    def __init__(self) -> None:
        if not self.detect():
            raise SlurmLayoutError(
                "trainer=slurm runs in a SLURM batch job (sbatch slurm/single_node.sbatch ...), and this process is "
                "not in one (no SLURM_NTASKS, or an interactive job): use trainer=gpu, trainer=ddp or trainer=cpu here."
            )
        super().__init__(auto_requeue=False)

    def validate_settings(self, num_devices: int, num_nodes: int) -> None:
        if self.job_name() in ("bash", "interactive"):  # Lightning's opt-out: not a batch job
            return
        env = os.environ
        tasks, nodes = int(env["SLURM_NTASKS"]), int(env.get("SLURM_NNODES", "1"))
        if tasks > 1 and "SLURM_STEP_ID" not in env:
            raise SlurmLayoutError(
                f"The job has {tasks} tasks but train.py was started by the batch script itself: start it with "
                "`srun python train.py ...` (as slurm/*.sbatch do), which starts one process per task."
            )
        per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1"))
        if nodes != num_nodes:
            raise SlurmLayoutError(
                f"The job has {nodes} node(s) (sbatch --nodes={nodes}) but trainer.num_nodes={num_nodes}: submit "
                f"with --nodes={num_nodes}, or drop the trainer.num_nodes override (trainer=slurm reads it from the "
                "job)."
            )
        if per_node != num_devices:
            raise SlurmLayoutError(
                f"The job runs {per_node} task(s) per node (sbatch --ntasks-per-node={per_node}) but "
                f"trainer.devices={num_devices}, and Lightning needs one task per device: submit with "
                f"--ntasks-per-node={num_devices} (and --gpus-per-node={num_devices} on GPUs), or drop the "
                "trainer.devices override (trainer=slurm reads it from the job)."
            )
        log.info(
            "SLURM job %s (restart %s): SLURM_PROCID=%s of %d, SLURM_LOCALID=%s on %s; %d node(s) x %d task(s)",
            env.get("SLURM_JOB_ID"),
            env.get("SLURM_RESTART_COUNT", "0"),
            env.get("SLURM_PROCID"),
            tasks,
            env.get("SLURM_LOCALID"),
            socket.gethostname(),
            nodes,
            per_node,
        )
