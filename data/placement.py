"""Where each rank reads and makes its pixels: its shard of the data, its device, its data threads and cores, and the
run's precision. Decided once per run from the Trainer and handed to the loader with the split and the spec, as a
``BatchRequest``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from data import affinity
from data.ilsvrc import Split
from data.shard_set import ShardSplit
from data.spec import ImageSpec


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world_size`` reads its own part of each split."""

    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class Placement:
    """``device``: where batches go (the rank's GPU, or the CPU); ``workers``: DataLoader workers or DALI threads;
    ``cpus``: the cores the rank's data threads may use (empty: not pinned); ``precision``: Lightning's setting."""

    device: torch.device = torch.device("cpu")
    workers: int = 0
    cpus: tuple[int, ...] = ()
    precision: str = "32-true"

    @property
    def half_dtype(self) -> torch.dtype | None:
        return half_dtype(self.precision)


@dataclass(frozen=True)
class BatchRequest:
    """What a loader is asked for: batches of ``split`` (image files, or a shard set's tar shards) made as ``spec``
    says, ``batch_size`` images each, for the rank that ``shard`` names, placed as ``placement`` says."""

    split: Split | ShardSplit
    spec: ImageSpec
    batch_size: int
    shard: Shard = Shard()
    placement: Placement = Placement()


def half_dtype(precision: str | int) -> torch.dtype | None:
    """The 16-bit dtype a Lightning precision setting computes in (``bf16-mixed`` -> bfloat16), None for 32/64 bits."""
    return {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])


def shard_of(trainer: pl.Trainer | None) -> Shard:
    """This process's shard, from the Trainer's public ranks (global rank: one shard per process of every node)."""
    return Shard(trainer.global_rank, trainer.world_size) if trainer is not None else Shard()


def placement_of(trainer: pl.Trainer | None, num_workers: int | str) -> Placement:
    """The rank's device and precision from the Trainer, and its share of the node's cores (data/affinity.py), those
    near its GPU first; ``num_workers`` as configured, or ``auto``: those cores less one."""
    if trainer is None:
        device, local_rank, local_world, precision = torch.device("cpu"), 0, 1, "32-true"
    else:
        device, local_rank = trainer.strategy.root_device, trainer.local_rank
        local_world, precision = trainer.num_devices, str(trainer.precision)
    near = affinity.gpu_local_cpus(device.index) if device.type == "cuda" else None
    cpus = affinity.rank_cpus(local_rank, local_world, near)
    return Placement(device, affinity.data_workers(num_workers, cpus), tuple(cpus), precision)
