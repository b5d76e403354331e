"""The hang watchdog: a hung rank in 2-process DDP on the CPU (gloo) is reported and the run exits; a slow start-up or
validation is not a hang; heartbeats and the progress file; the collective timeout checked against the limit."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from assemble import instantiate_all
from callbacks.heartbeat import DATA, STEP
from callbacks.watchdog import HANG_EXIT_CODE, HangWatchdog, heartbeat_report
from data.spec import ConfigError
from runs.restart_marker import PROGRESS_FILE_ENV
from slurm.environment import SlurmJob

from .conftest import PROJECT_ROOT, SMALL_RUN

DDP = [*SMALL_RUN, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
LIMIT_S = 12  # callbacks.watchdog.minutes=0.2
MARGIN_S = 25  # the watchdog's period (3 s), the launcher's grace for its ranks (6 s), a loaded 2-core machine


def _group_alive(group: int) -> list[int]:
    """The processes of a process group that have not exited (zombies aside)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _run_ddp(tmp_path: Path, *overrides: str, timeout: float = 300, env: dict | None = None):
    """train.py in its own process group, as tests.conftest.run_train runs it; returns (exit code, output, the time
    it exited, the processes of its group still alive 10 s later). The group is killed in the end, whatever
    happened."""
    command = [
        sys.executable,
        str(PROJECT_ROOT / "train.py"),
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]
    output = tmp_path / "output.txt"
    with open(output, "w") as out:
        process = subprocess.Popen(
            command, cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    try:
        code = process.wait(timeout)
        exited = time.time()
        deadline = time.monotonic() + 10
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        return code, output.read_text(), exited, _group_alive(process.pid)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _hang(tmp_path: Path, how: str) -> list[str]:
    hang = "+callbacks.hang"
    return [
        f"{hang}._target_=tests.observers.HangRank",
        f"{hang}.rank=1",
        f"{hang}.step=3",
        f"{hang}.how={how}",
        f"{hang}.marker={tmp_path / 'hung_at'}",
    ]


def test_a_rank_asleep_in_mid_epoch_is_dumped_and_named_and_the_run_exits(tmp_path: Path):
    """Rank 1 sleeps forever after step 3: its own dump shows the sleeping frame, its report names it as the rank
    rank 0 waits for, and the run ends within the limit and a margin, leaving no process behind."""
    code, log, exited, left = _run_ddp(tmp_path, *DDP, "callbacks.watchdog.minutes=0.2", *_hang(tmp_path, "sleep"))
    hung_at = float((tmp_path / "hung_at").read_text())
    host = socket.gethostname()
    assert code != 0, log[-3000:]  # 75, or rank 0's error once rank 1 left the process group first
    assert exited - hung_at < LIMIT_S + MARGIN_S, log[-3000:]
    assert left == []
    assert re.search(rf"Hang watchdog: rank 1 on {host} \(pid \d+\) has had no training step", log), log[-3000:]
    assert "in sleep_forever" in log  # rank 1's stack
    assert re.search(r"  rank 0 on \S+ \(pid \d+\): step 3, ", log)
    assert re.search(r"  rank 1 on \S+ \(pid \d+\): step 3, .* in sleep_forever \(observers.py:\d+\)", log)
    assert re.search(rf"rank 1 on {host} \(pid \d+\) is not waiting for the others .* while rank\(s\) \[0\]", log)
    assert f"Hang watchdog: rank 1 exits with code {HANG_EXIT_CODE}" in log


@pytest.mark.slow
def test_a_stopped_rank_is_named_by_the_others_with_its_host_and_heartbeat_age(tmp_path: Path):
    """Rank 1 stops itself (SIGSTOP) after step 3, and cannot report: rank 0 names it silent, with its host and the
    age of its heartbeat, kills it (the rank it started) and exits with HANG_EXIT_CODE."""
    code, log, exited, left = _run_ddp(tmp_path, *DDP, "callbacks.watchdog.minutes=0.2", *_hang(tmp_path, "stop"))
    hung_at = float((tmp_path / "hung_at").read_text())
    assert code == HANG_EXIT_CODE, log[-3000:]
    assert exited - hung_at < LIMIT_S + MARGIN_S
    assert left == []
    assert "Hang watchdog: rank 0 on" in log and "Hang watchdog: rank 1 on" not in log
    stale = re.search(rf"rank 1 on {socket.gethostname()} \(pid \d+\) is silent: its heartbeat is (\d+) s old", log)
    assert stale and int(stale[1]) > LIMIT_S / 2, log[-3000:]
    assert "in optimizer_step" in log  # rank 0's stack: its step waits in DDP's gradient all-reduce for rank 1
    assert re.search(r"killing pid \d+, a rank this process started", log)
    assert f"Hang watchdog: rank 0 exits with code {HANG_EXIT_CODE}" in log


@pytest.mark.slow
def test_slow_start_up_and_validation_are_not_hangs_and_heartbeats_remain(tmp_path: Path):
    """Training start and each validation (one in mid-epoch, batch by batch) take longer than the limit plus its
    period on both ranks: the run completes without a report; a heartbeat file per rank holds the last step and the
    end; the progress file was touched."""
    progress = tmp_path / "progress"
    slow = ["+callbacks.slow._target_=tests.observers.SlowStartAndValidation", "+callbacks.slow.seconds=9"]
    code, log, _, left = _run_ddp(
        tmp_path,
        *DDP,
        "callbacks.watchdog.minutes=0.1",  # 6 s, checked every 1.5 s
        "trainer.max_epochs=1",
        "+trainer.val_check_interval=3",  # validation at step 3 and at the end, with training between
        "data.root.val_per_class=20",  # 40 val images per rank: 2 batches of 20, 9 s in all
        "+trainer.num_sanity_val_steps=0",
        *slow,
        env={PROGRESS_FILE_ENV: str(progress)},
    )
    assert code == 0, log[-3000:]
    assert left == []
    assert "Hang watchdog" not in log
    beats = [json.loads((tmp_path / "run" / "heartbeats" / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(beat["rank"], beat["step"], beat["phase"]) for beat in beats] == [(0, 6, "finished"), (1, 6, "finished")]
    assert {beat["host"] for beat in beats} == {socket.gethostname()} and beats[0]["pid"] != beats[1]["pid"]
    assert progress.exists()


def test_the_progress_file_is_touched_once_by_rank_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    progress = tmp_path / "progress"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(progress))
    for rank in (1, 0):
        watchdog = HangWatchdog(minutes=1)
        trainer = SimpleNamespace(is_global_zero=rank == 0)
        watchdog.on_train_batch_end(trainer, None, None, None, 0)
        assert progress.exists() == (rank == 0)
    progress.unlink()
    watchdog.on_train_batch_end(trainer, None, None, None, 1)
    assert not progress.exists()


def _beat(rank: int, step: int, phase: str, where: str, age: float, in_distributed: bool = False) -> dict:
    now = 1000.0
    return {"rank": rank, "host": f"node{rank}", "pid": 100 + rank, "step": step, "phase": phase, "phase_s": 5.0,
            "where": where, "in_distributed": in_distributed, "time": now - age}  # fmt: skip


def test_the_report_names_silent_missing_behind_and_unwaiting_ranks():
    beats = {
        0: _beat(0, 7, DATA, "broadcast (distributed_c10d.py:1)", age=1, in_distributed=True),
        1: _beat(1, 7, DATA, "next (loader.py:9)", age=1),
        2: _beat(2, 6, STEP, "backward (__init__.py:3)", age=2),
        3: _beat(3, 5, DATA, "sleep (x.py:1)", age=40),
        4: None,
    }
    report = heartbeat_report(beats, silent_after_s=16, now=1000.0)
    assert (
        "  rank 1 on node1 (pid 101): step 7, waiting for data for 6 s, in next (loader.py:9); heartbeat 1.0 s old"
        in report
    )
    assert "rank 3 on node3 (pid 103) is silent: its heartbeat is 40 s old" in report
    assert "rank 4 wrote no heartbeat" in report
    assert "rank 2 on node2 is behind: step 6, the furthest rank is at step 7" in report
    assert "rank 3 on node3 is behind" not in report  # a silent rank's step is as old as its heartbeat
    assert "rank 1 on node1 (pid 101) is not waiting for the others (waiting for data, in next (loader.py:9))" in report
    assert "rank 0 on node0 (pid 100) is not waiting" not in report
    quiet = heartbeat_report({0: beats[0], 1: _beat(1, 7, DATA, "broadcast", 1, True)}, silent_after_s=16, now=1000.0)
    assert quiet.endswith("no rank stands out: look for a frame every rank's stack shares (a collective all wait in)")


def test_a_collective_timeout_within_the_watchdog_limit_is_refused_naming_both_keys(make_cfg):
    cfg = make_cfg(*DDP, "trainer.strategy.timeout.minutes=10")
    with pytest.raises(InstantiationException) as raised:
        instantiate_all(cfg.callbacks)
    assert isinstance(raised.value.__cause__, ConfigError)
    message = str(raised.value.__cause__)
    assert "trainer.strategy.timeout='0:10:00' is not allowed" in message
    assert "longer than callbacks.watchdog.minutes=15" in message
    watchdog = [c for c in instantiate_all(make_cfg(*DDP).callbacks) if isinstance(c, HangWatchdog)]
    assert [w.limit_s for w in watchdog] == [900.0]
    assert instantiate_all(make_cfg(*DDP, "trainer.strategy=ddp").callbacks)  # by name: Lightning's own timeout


def test_the_ddp_trainer_is_lightnings_ddp_with_the_timeout(make_cfg):
    """As strategy=ddp: the popen launcher (Lightning's subprocess script launcher), and the configured timeout."""
    trainer = instantiate(make_cfg(*DDP).trainer)
    assert type(trainer.strategy) is DDPStrategy and trainer.strategy._timeout == timedelta(minutes=30)
    assert isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher) and trainer.world_size == 2


def test_the_slurm_trainer_keeps_its_cluster_environment(make_cfg, monkeypatch: pytest.MonkeyPatch):
    """trainer=slurm in a 2-task batch job on 1 node: ranks from SLURM (SlurmJob, srun starts the processes), the
    timeout."""
    job = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "train",
           "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
           "SLURM_NODELIST": "node1", "SLURM_JOB_ID": "42"}  # fmt: skip
    for name, value in job.items():
        monkeypatch.setenv(name, value)
    trainer = instantiate(
        make_cfg(*SMALL_RUN, "trainer=slurm", "trainer.accelerator=cpu", "trainer.precision=32-true").trainer
    )
    assert isinstance(trainer.strategy.cluster_environment, SlurmJob)
    assert (trainer.global_rank, trainer.world_size) == (1, 2)
    assert trainer.strategy.cluster_environment.creates_processes_externally
    assert trainer.strategy._timeout == timedelta(minutes=30)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["validation", "checkpoint"])
def test_a_rank_that_hangs_in_validation_or_a_checkpoint_save_is_reported(tmp_path: Path, where: str):
    """Validation has the limit of each of its batches, a checkpoint's save the whole limit: rank 1 asleep after its
    first validation batch, or in its first save (rank 0 then waits in the save's barrier), is reported within the
    limit and a margin, and the run exits."""
    hang = ["+callbacks.hang._target_=tests.observers.HangIn", "+callbacks.hang.rank=1",
            f"+callbacks.hang.where={where}", f"+callbacks.hang.marker={tmp_path / 'hung_at'}"]  # fmt: skip
    phase = {"validation": "validation", "checkpoint": "saving a checkpoint"}[where]
    code, log, exited, left = _run_ddp(tmp_path, *DDP, "callbacks.watchdog.minutes=0.2", *hang)
    hung_at = float((tmp_path / "hung_at").read_text())
    assert code != 0, log[-3000:]
    assert exited - hung_at < LIMIT_S + MARGIN_S, log[-3000:]
    assert left == []
    assert f"in phase '{phase}" in log and "in sleep_forever" in log, log[-3000:]
