"""Each rank's data threads on its own cores: the split, and real DALI threads pinned to it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from data import affinity, dali
from data.ilsvrc import load_layout
from data.placement import Placement
from tests.loaders import loader, small_spec

ALLOWED = sorted(os.sched_getaffinity(0))


def _thread_cpus() -> dict[str, str]:
    """Name -> allowed CPU list of this process's threads, as the kernel reports them."""
    threads = {}
    for task in Path("/proc/self/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        threads[f"{(task / 'comm').read_text().strip()} {task.name}"] = status["Cpus_allowed_list"].strip()
    return threads


def test_cpulist_format():
    assert affinity._parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_ranks_of_a_node_split_its_cores(monkeypatch, ranks: int):
    cores = list(range(16))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    slices = [affinity.rank_cpus(rank, ranks) for rank in range(ranks)]
    assert sorted(cpu for s in slices for cpu in s) == cores  # disjoint, and every core used
    assert max(map(len, slices)) - min(map(len, slices)) <= 1


def test_a_process_bound_to_its_share_keeps_it(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 6})  # e.g. srun --cpus-per-task=2 --cpu-bind=cores
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert affinity.rank_cpus(3, 8) == [5, 6]


def test_ranks_split_the_cores_near_their_gpus(monkeypatch):
    """8 GPUs, 0-3 near cores 0-15 and 4-7 near 16-31: rank 5 gets its share of 16-31."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setattr(affinity, "gpu_local_cpus", lambda gpu: list(range(16)) if gpu < 4 else list(range(16, 32)))
    assert affinity.rank_cpus(5, 8, affinity.gpu_local_cpus(5)) == [20, 21, 22, 23]
    assert affinity.pipeline_threads([20, 21, 22, 23]) == 3
    assert affinity.affinity_mask([20, 21], 3) == "20,21,20"


@pytest.mark.skipif(len(ALLOWED) < 2, reason="needs 2 usable CPU cores")
def test_dali_threads_run_on_the_rank_cores(small_demo_root: Path, monkeypatch):
    """Two ranks' worth of cores on this machine: rank 1's DALI pipeline threads, and the threads that resize for
    it, are allowed only its core."""
    monkeypatch.setenv("DALI_AFFINITY_MASK", "")
    monkeypatch.delenv("DALI_AFFINITY_MASK")  # and restored as it was after the test
    cpus = affinity.rank_cpus(1, 2)
    assert cpus == [ALLOWED[1]]
    before = set(_thread_cpus())
    placement = Placement(workers=2, cpus=tuple(cpus))
    batches = loader(
        "dali", load_layout(small_demo_root).train, train=True, batch_size=8, spec=small_spec(), placement=placement
    )
    next(iter(batches))  # the pipeline and its threads live as long as the loader
    workers = {name: allowed for name, allowed in _thread_cpus().items() if name not in before and "[DALI][TP" in name}
    assert len(workers) == 2 and set(workers.values()) == {str(cpus[0])}, workers
    resizers = {str(thread.native_id) for thread in threading.enumerate() if thread.name.startswith("dali-resize")}
    resizing = {
        name: allowed for name, allowed in _thread_cpus().items() if name not in before and name.split()[-1] in resizers
    }
    assert len(resizing) == 2 and set(resizing.values()) == {str(cpus[0])}, resizing
    assert os.environ["DALI_AFFINITY_MASK"].startswith(f"{cpus[0]},{cpus[0]},")


def test_a_user_mask_is_left_as_it_is(monkeypatch):
    monkeypatch.setenv("DALI_AFFINITY_MASK", "0,0")
    dali.pin_threads([1], 2)
    assert os.environ["DALI_AFFINITY_MASK"] == "0,0"
