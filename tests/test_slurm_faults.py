"""Faults without a warning on the two-node test cluster (slurm marker): a lost node, a hung rank, a crash that
repeats, a job submitted twice into one run folder. Each job resumes by itself from its newest checkpoint."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from runs.checkpoints import TIMED, checkpoint_files
from tests.slurm_jobs import (
    STEPS_PER_EPOCH,
    job_field,
    kill_node,
    start_node,
    steps_of,
    template_job,
    wait_for_job,
)

# a time-based checkpoint every few steps, the ranks agreeing every 2 steps; a requeued start whose rank 0 moved
# to the other node takes the run lock over within 6 s (its earlier holder's heartbeat, every 2 s, gone stale)
OFTEN = [
    "callbacks.mid_epoch_checkpoint.every_minutes=0.02",
    "callbacks.mid_epoch_checkpoint.check_every_n_steps=2",
    "run_lock.refresh_s=2",
]


def observe_steps(folder: Path) -> list[str]:
    return ["+callbacks.steps._target_=tests.observers.StepLog", f"+callbacks.steps.folder={folder}"]


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.2)


def newest_time_based_step(run: Path) -> int:
    return max((checkpoint.order for checkpoint in checkpoint_files(run) if checkpoint.kind == TIMED), default=0)


def trained_steps(folder: Path, rank: int) -> list[tuple[int, int]]:
    """(step, SLURM restart count) of every step the rank started, in order."""
    lines = (folder / f"rank{rank}.log").read_text().splitlines()
    return [tuple(map(int, line.split())) for line in lines]


def resumed_step(log: str) -> int:
    match = re.search(r"Resuming from \S+ \([a-z-]+, global step (\d+),", log)
    assert match, log[-4000:]
    return int(match[1])


def assert_each_step_after_the_checkpoint_trained_once(folder: Path, ranks: int, saved: int, total: int) -> None:
    for rank in range(ranks):
        again = [step for step, restart in trained_steps(folder, rank) if restart == 1]
        assert again == list(range(saved + 1, total + 1)), (rank, again)


def task_pid(job: str, rank: int) -> int:
    """The train.py process of the job's task ``rank`` (the cluster's nodes share this machine's process table)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if (
            b"train.py" in cmdline
            and f"SLURM_JOB_ID={job}".encode() in environ
            and f"SLURM_PROCID={rank}".encode() in environ
        ):
            return int(proc.name)
    raise AssertionError(f"no train.py task of rank {rank} in job {job}")


@pytest.mark.slurm
def test_a_lost_node_requeues_the_job_which_resumes_from_its_newest_checkpoint(cluster, tmp_path: Path):
    """2 nodes x 1 task; node2's slurmd and task are killed in mid-epoch, no signal to the job. SLURM marks the node
    down (SlurmdTimeout, shorter than the watchdog) and requeues the job; with node2 back, the job resumes with no
    flag from the newest time-based checkpoint, trains each step after it once, and ends at the uninterrupted count."""
    steps, epochs = tmp_path / "steps", 3
    job = template_job(
        cluster, tmp_path, "multi_node.sbatch", f"trainer.max_epochs={epochs}", *OFTEN, *observe_steps(steps),
        "callbacks.watchdog.minutes=3", nodes=2, tasks=1,
    )  # fmt: skip
    run = tmp_path / "outputs" / "train" / job
    wait_until(lambda: newest_time_based_step(run) >= 3, 300, "a time-based checkpoint in epoch 0")
    kill_node(cluster, "node2")
    wait_until(lambda: job_field(job, "Restarts") == "1", 180, "SLURM requeues the job")
    start_node(cluster, "node2")
    state = wait_for_job(job, timeout=400)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "COMPLETED" and job_field(job, "Restarts") == "1", log[-4000:]
    assert "automatic restart" not in log  # requeued by SLURM for the node, not by the batch script
    saved = resumed_step(log)
    assert 3 <= saved < epochs * STEPS_PER_EPOCH
    assert_each_step_after_the_checkpoint_trained_once(steps, 2, saved, epochs * STEPS_PER_EPOCH)
    assert steps_of(run / "checkpoints" / "last.ckpt") == (epochs * STEPS_PER_EPOCH, epochs - 1)


@pytest.mark.slurm
def test_a_hung_rank_is_ended_by_the_watchdog_and_the_requeued_job_resumes(cluster, tmp_path: Path):
    """SIGSTOP on one task in mid-epoch: the other rank's watchdog writes the stacks and every rank's heartbeat to the
    log and exits within its limit plus a margin; the batch script requeues the job, which resumes and completes."""
    steps, epochs, limit_s = tmp_path / "steps", 3, 15
    job = template_job(
        cluster, tmp_path, "single_node.sbatch", f"trainer.max_epochs={epochs}", *OFTEN, *observe_steps(steps),
        f"callbacks.watchdog.minutes={limit_s / 60}", tasks=2,
    )  # fmt: skip
    run = tmp_path / "outputs" / "train" / job
    wait_until(lambda: newest_time_based_step(run) >= 3, 300, "a time-based checkpoint in epoch 0")
    os.kill(task_pid(job, rank=1), signal.SIGSTOP)
    stopped = time.monotonic()
    wait_until(lambda: job_field(job, "Restarts") == "1", limit_s + 60, "the watchdog ends the job, which is requeued")
    ended_after = time.monotonic() - stopped
    state = wait_for_job(job, timeout=400)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    assert ended_after < limit_s + 45, ended_after  # the watchdog's own polling, the dump, srun's kill, the requeue
    assert "requeued (automatic restart 1 of 3)" in log
    assert "hang watchdog" in log.lower() and "Traceback" not in log.split("requeued (automatic")[0][-200:]
    assert re.search(r"rank 1 .*heartbeat", log), log[-6000:]  # the stopped rank, named by the other
    saved = resumed_step(log)
    assert_each_step_after_the_checkpoint_trained_once(steps, 2, saved, epochs * STEPS_PER_EPOCH)
    assert steps_of(run / "checkpoints" / "last.ckpt") == (epochs * STEPS_PER_EPOCH, epochs - 1)


@pytest.mark.slurm
def test_a_crash_that_repeats_is_requeued_up_to_the_cap(cluster, tmp_path: Path):
    """A bug at step 4 of every run: requeued once (MAX_CRASH_RESTARTS=1), then the job fails saying so."""
    crash = ["+callbacks.crash._target_=tests.observers.CrashAtStep", "+callbacks.crash.step=4"]
    job = template_job(
        {**cluster, "MAX_CRASH_RESTARTS": "1"}, tmp_path, "single_node.sbatch", "trainer.max_epochs=2", *OFTEN,
        *crash, tasks=1,
    )  # fmt: skip
    state = wait_for_job(job, timeout=400)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "FAILED" and job_field(job, "Restarts") == "1", log[-4000:]
    assert log.count("planted crash at step 4") >= 2
    assert "requeued (automatic restart 1 of 1)" in log
    assert "after 1 automatic restarts, the cap (MAX_CRASH_RESTARTS=1): not requeued" in log
    assert f"Resubmit with run_id={job}" in log


@pytest.mark.slurm
def test_one_run_folder_one_job_and_a_new_job_continues_an_old_run(cluster, tmp_path: Path):
    """A second job into a running job's folder (run_id=) stops at once naming the holder, and is not requeued; once
    the first has ended, a new job with its run_id continues from its newest checkpoint."""
    steps, epochs = tmp_path / "steps", 15  # long enough (about 30 s) for the second job to meet it
    first = template_job(
        cluster, tmp_path, "single_node.sbatch", f"trainer.max_epochs={epochs}", *observe_steps(steps), tasks=1
    )
    wait_until(lambda: (steps / "rank0.log").exists(), 300, "the first job trains")
    second = template_job(cluster, tmp_path, "single_node.sbatch", f"run_id={first}", tasks=1)
    assert wait_for_job(second, timeout=300) == "FAILED"
    second_log = next(tmp_path.glob(f"*-{second}.out")).read_text()
    assert "RunFolderLocked" in second_log and f"SLURM job {first}" in second_log, second_log[-3000:]
    assert "before training began" in second_log and job_field(second, "Restarts") == "0"
    assert job_field(first, "JobState") == "RUNNING"  # untouched by the second
    assert wait_for_job(first, timeout=300) == "COMPLETED"

    steps_per_epoch = 2 * STEPS_PER_EPOCH  # one task
    third = template_job(
        cluster, tmp_path, "single_node.sbatch", f"run_id={first}", f"trainer.max_epochs={epochs + 1}", tasks=1
    )
    assert wait_for_job(third, timeout=300) == "COMPLETED"
    third_log = next(tmp_path.glob(f"*-{third}.out")).read_text()
    last = tmp_path / "outputs" / "train" / first / "checkpoints" / "last.ckpt"
    assert f"Resuming from {last} (last, global step {epochs * steps_per_epoch}" in third_log
    assert steps_of(last) == ((epochs + 1) * steps_per_epoch, epochs)
    assert not (tmp_path / "outputs" / "train" / third).exists()
