"""Which CPU cores the data pipeline of each rank gets: a disjoint slice per rank, near its GPU where one is known.

Written by hand because DALI pins its threads only to a given list (``DALI_AFFINITY_MASK``) or to all the cores
NVML reports near the GPU, which the ranks of GPUs on one socket would then share.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _parse_cpulist(text: str) -> list[int]:
    """Linux's CPU list format: ``0-3,8,10-11``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def gpu_local_cpus(device_index: int) -> list[int]:
    """The cores of the NUMA node the GPU hangs off (its PCI device's ``local_cpulist``); empty where unknown."""
    properties = torch.cuda.get_device_properties(device_index)
    address = f"{properties.pci_domain_id:04x}:{properties.pci_bus_id:02x}:{properties.pci_device_id:02x}.0"
    cpulist = Path("/sys/bus/pci/devices", address, "local_cpulist")
    return _parse_cpulist(cpulist.read_text()) if cpulist.exists() else []


def rank_cpus(local_rank: int, local_world_size: int, gpu_local: list[int] | None = None) -> list[int]:
    """This rank's cores: the ones it may run on, split evenly between the ranks of this node.

    A process already bound to its share or less (``srun --cpu-bind``, ``taskset``) keeps what it has. With
    ``gpu_local`` (the cores near this rank's GPU), the ranks whose GPUs share those cores split them instead.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= max(1, (os.cpu_count() or 1) // local_world_size):
        return allowed
    near = [cpu for cpu in allowed if cpu in set(gpu_local or ())]
    if near:
        sharing = [rank for rank in range(local_world_size) if set(gpu_local_cpus(rank)) & set(near)]
        if local_rank in sharing and len(near) >= len(sharing):
            return _slice(near, sharing.index(local_rank), len(sharing))
    return _slice(allowed, local_rank, local_world_size)


def _slice(cpus: list[int], index: int, parts: int) -> list[int]:
    """The ``index``-th of ``parts`` contiguous, near-equal slices; a shared list when there are fewer cores."""
    if len(cpus) < parts:
        return cpus
    size, extra = divmod(len(cpus), parts)
    start = index * size + min(index, extra)
    return cpus[start : start + size + (index < extra)]


def pipeline_threads(cpus: list[int]) -> int:
    """Data threads for a rank with these cores: all but one, which the rank's own Python thread needs."""
    return max(1, len(cpus) - 1)


def data_workers(num_workers: int | str, cpus: list[int]) -> int:
    """``data.num_workers`` as a count: itself, or with ``auto`` the threads for a rank with these cores."""
    return pipeline_threads(cpus) if num_workers == "auto" else int(num_workers)


def affinity_mask(cpus: list[int], threads: int) -> str:
    """``DALI_AFFINITY_MASK``: one core per DALI thread, the rank's cores in turn."""
    return ",".join(str(cpus[i % len(cpus)]) for i in range(threads))
