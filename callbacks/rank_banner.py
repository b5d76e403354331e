"""Every rank's first log lines say where it runs and with what: host, ranks, device, the cores it may run on, its
data threads and where its JPEGs are decoded, precision and SLURM job. On every rank, because a wrong binding is
one rank's: a task that srun bound to fewer cores than the job gives it (SLURM 22.05-23.02 do not pass sbatch's
--cpus-per-task on to srun) shows here, with a warning, instead of as a slow data pipeline."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_CPUS_PER_TASK")


def cpu_list(cpus: Iterable[int]) -> str:
    """Linux's CPU list format, as ``taskset -c`` and /proc/self/status write it: ``0-3,8,10-11``."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(first) if first == last else f"{first}-{last}" for first, last in ranges)


def device_name(device: torch.device) -> str:
    """``CPU``, or the GPU's index, name and UUID (as nvidia-smi -L writes it)."""
    if device.type != "cuda":
        return "CPU"
    properties = torch.cuda.get_device_properties(device.index)
    return f"GPU {device.index}: {properties.name} (UUID: GPU-{properties.uuid})"


def binding_warnings(rank: int, cores: list[int], data_threads: int, cpus_per_task: int | None) -> list[str]:
    """What is wrong with where this rank may run: fewer cores than the job gives each task, or than its data
    threads."""
    found = []
    if cpus_per_task is not None and len(cores) < cpus_per_task:
        found.append(
            f"rank {rank} may run on {len(cores)} core(s) but the job gives each task {cpus_per_task} "
            f"(SLURM_CPUS_PER_TASK): srun was started without --cpus-per-task, which SLURM 22.05-23.02 do not take "
            "from sbatch; start it as slurm/*.sbatch do (srun --cpus-per-task=$SLURM_CPUS_PER_TASK)"
        )
    if len(cores) < data_threads:
        found.append(
            f"rank {rank} runs {data_threads} data thread(s) or worker(s) on {len(cores)} core(s): they take turns "
            "on them (data.num_workers=auto fits them to the cores)"
        )
    return found


class RankBanner(pl.Callback):
    """Logs each rank's placement once, at setup, through Python logging on every rank (not rank zero only)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        rank = trainer.global_rank
        cores = sorted(os.sched_getaffinity(0))
        datamodule = trainer.datamodule
        placement = datamodule.placement
        lines = [
            f"rank {rank} of {trainer.world_size} (local rank {trainer.local_rank} of {trainer.num_devices}) "
            f"on {socket.gethostname()}",
            f"device: {device_name(trainer.strategy.root_device)}",
            f"cores it may run on: {cpu_list(cores)} ({len(cores)})",
            f"data: JPEGs decoded on {datamodule.loader.where_decoded(placement)}; "
            f"data cores {cpu_list(placement.cpus) or 'not pinned'}",
            f"precision: {trainer.precision}",
        ]
        slurm = [f"{name}={os.environ[name]}" for name in SLURM_VARIABLES if name in os.environ]
        if slurm:
            lines.append("SLURM: " + ", ".join(slurm))
        log.info("\n".join(lines[:1] + [f"rank {rank} {line}" for line in lines[1:]]))
        cpus_per_task = os.environ.get("SLURM_CPUS_PER_TASK")
        for warning in binding_warnings(rank, cores, placement.workers, int(cpus_per_task) if cpus_per_task else None):
            log.warning(warning)
