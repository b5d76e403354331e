"""runs/lock.py with real processes: a run folder holds one job; a holder judged gone (dead or reused pid, a SLURM
job squeue no longer runs, a silent host, a requeued job's earlier start) is taken over by exactly one contender."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import pytest

from runs.lock import LOCK_NAME, RunFolderLock, RunFolderLocked, RunFolderNotWritable

from .conftest import PROJECT_ROOT

SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
FOREIGN_HOST = "node-elsewhere"

# Holds the lock on argv[1] (heartbeat every argv[2] s) until its stdin closes; logs to stderr.
HOLD = """
import logging, sys
from runs.lock import RunFolderLock
logging.basicConfig(level=logging.INFO)
lock = RunFolderLock(sys.argv[1], refresh_s=float(sys.argv[2]))
lock.acquire()
print("held", flush=True)
sys.stdin.read()
"""

# Waits for the file argv[2], then contends for the lock on argv[1]; holds what it won until its stdin closes.
CONTEND = """
import os, sys, time
from runs.lock import RunFolderLock, RunFolderLocked
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    RunFolderLock(sys.argv[1]).acquire()
    print("won", flush=True)
except RunFolderLocked:
    print("lost", flush=True)
sys.stdin.read()
"""


def _environment(**slurm: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SLURM_VARIABLES}
    return {**env, **slurm}


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process under test starts outside any SLURM job; a test sets the variables it means."""
    for name in SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@contextmanager
def holder(run_dir: Path, refresh_s: float = 30.0, **slurm: str) -> Iterator[subprocess.Popen]:
    """A process that holds the lock until the block ends."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir), str(refresh_s)],
        cwd=PROJECT_ROOT,
        env=_environment(**slurm),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "held\n", process.stderr.read()
        yield process
    finally:
        if process.poll() is None:
            process.stdin.close()
        process.wait(timeout=10)


def _stamp(age_s: float) -> str:
    return datetime.fromtimestamp(time.time() - age_s, timezone.utc).isoformat(timespec="milliseconds")


def write_lock(
    run_dir: Path,
    *,
    host: str = FOREIGN_HOST,
    pid: int = 4242,
    heartbeat_age_s: float = 0.0,
    job: str | None = None,
    restart: int | None = None,
    start_time: int | None = None,
) -> dict:
    """A lock file as another process would have left it."""
    record = {
        "host": host,
        "pid": pid,
        "start_time": start_time,
        "boot_id": None,
        "slurm_job_id": job,
        "slurm_restart_count": restart,
        "taken_at": _stamp(heartbeat_age_s + 60),
        "heartbeat_at": _stamp(heartbeat_age_s),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = run_dir / "staging"
    staging.write_text(json.dumps(record))
    os.replace(staging, run_dir / LOCK_NAME)
    return record


def read_lock(run_dir: Path) -> dict:
    return json.loads((run_dir / LOCK_NAME).read_text())


def fake_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stdout: str, stderr: str = "", rc: int = 0) -> Path:
    """``squeue`` first on PATH, answering as a real one does; returns the file where it writes its arguments."""
    folder = tmp_path / "bin"
    folder.mkdir()
    calls = tmp_path / "squeue-args"
    script = folder / "squeue"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nprintf "{stdout}"\nprintf "{stderr}" >&2\nexit {rc}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return calls


def took_over(caplog: pytest.LogCaptureFixture) -> str:
    warnings = [r.getMessage() for r in caplog.records if r.name == "runs.lock" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Took over the run lock")
    return warnings[0]


def test_a_live_holder_refuses_with_its_name_and_the_fix(run_dir: Path):
    with holder(run_dir, SLURM_JOB_ID="111") as process:
        before = read_lock(run_dir)
        start = time.monotonic()
        with pytest.raises(RunFolderLocked) as error:
            RunFolderLock(run_dir).acquire()
        assert time.monotonic() - start < 2  # no waiting
        assert read_lock(run_dir) == before
    message = str(error.value)
    for part in (
        f"The run folder {run_dir} is in use by another run",
        f"host {socket.gethostname()}, pid {process.pid}, SLURM job 111, since ",
        "last heartbeat ",
        f"It counts as alive: pid {process.pid} still runs on this host. ",
        "`scancel 111`",
        "run_id=<another name>",
        str(run_dir / LOCK_NAME),
    ):
        assert part in message, message
    assert not (run_dir / LOCK_NAME).exists()  # the holder released it at its exit


def test_the_heartbeat_is_refreshed(run_dir: Path):
    with holder(run_dir, refresh_s=0.1):
        first = read_lock(run_dir)
        time.sleep(0.35)
        later = read_lock(run_dir)
    assert later["heartbeat_at"] > first["heartbeat_at"]
    assert {**later, "heartbeat_at": None} == {**first, "heartbeat_at": None}


def test_a_dead_holder_is_taken_over_with_a_warning(run_dir: Path, caplog: pytest.LogCaptureFixture):
    with holder(run_dir) as process:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert read_lock(run_dir)["pid"] == process.pid  # left behind
    caplog.set_level(logging.INFO, "runs.lock")
    with RunFolderLock(run_dir):
        assert read_lock(run_dir)["pid"] == os.getpid()
    warning = took_over(caplog)
    assert f"pid {process.pid}" in warning and f"pid {process.pid} no longer runs on this host" in warning


def test_a_reused_pid_is_not_the_holder(run_dir: Path, caplog: pytest.LogCaptureFixture):
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE) as other:
        stat = Path(f"/proc/{other.pid}/stat").read_text()
        started = int(stat[stat.rindex(")") + 2 :].split()[19])
        write_lock(run_dir, host=socket.gethostname(), pid=other.pid, start_time=started - 100)
        caplog.set_level(logging.INFO, "runs.lock")
        with RunFolderLock(run_dir):
            pass
        other.stdin.close()
    assert f"pid {other.pid} is now another process" in took_over(caplog)


@pytest.mark.parametrize("age_s", [2.0, 200.0])
def test_another_host_is_gone_once_its_heartbeat_is_stale(run_dir: Path, caplog: pytest.LogCaptureFixture, age_s):
    write_lock(run_dir, heartbeat_age_s=age_s)
    caplog.set_level(logging.INFO, "runs.lock")
    if age_s < 90:
        with pytest.raises(RunFolderLocked, match=f"host {FOREIGN_HOST}, pid 4242, since .*stale after 90 s"):
            RunFolderLock(run_dir).acquire()
        assert read_lock(run_dir)["host"] == FOREIGN_HOST
    else:
        with RunFolderLock(run_dir):
            pass
        assert "its heartbeat is 200 s old (stale after 90 s)" in took_over(caplog)


def test_an_unreadable_lock_is_judged_by_its_age(run_dir: Path, caplog: pytest.LogCaptureFixture):
    run_dir.mkdir()
    (run_dir / LOCK_NAME).write_text('{"host": "node-')  # cut short
    with pytest.raises(RunFolderLocked, match="in use by another run: an unreadable lock file, last written"):
        RunFolderLock(run_dir).acquire()
    os.utime(run_dir / LOCK_NAME, (time.time() - 1000, time.time() - 1000))
    caplog.set_level(logging.INFO, "runs.lock")
    with RunFolderLock(run_dir):
        pass
    assert "its heartbeat is 1000 s old" in took_over(caplog)


@pytest.mark.parametrize(
    "squeue, heartbeat_age_s, taken_over, reason",
    [
        (("RUNNING\n", "", 0), 1000, False, "squeue says SLURM job 222 is RUNNING"),
        (("", "slurm_load_jobs error: Invalid job id specified\n", 1), 0, True, "SLURM job 222 is no longer known"),
        (("PENDING\n", "", 0), 0, True, "squeue says SLURM job 222 is PENDING"),
        (("", "slurm_load_jobs error: Unable to contact slurm controller\n", 1), 0, False, "heartbeat is 0 s old"),
        (None, 0, False, "heartbeat is 0 s old"),  # no squeue: the heartbeat decides
        (None, 1000, True, "heartbeat is 1000 s old"),
    ],
)
def test_another_job_is_judged_by_squeue(
    run_dir, tmp_path, monkeypatch, caplog, squeue, heartbeat_age_s, taken_over, reason
):
    monkeypatch.setenv("SLURM_JOB_ID", "333")
    if squeue is None:
        monkeypatch.setenv("PATH", str(tmp_path))
    else:
        calls = fake_squeue(tmp_path, monkeypatch, *squeue)
    write_lock(run_dir, job="222", heartbeat_age_s=heartbeat_age_s)
    caplog.set_level(logging.INFO, "runs.lock")
    if taken_over:
        with RunFolderLock(run_dir):
            assert read_lock(run_dir)["slurm_job_id"] == "333"
        assert reason in took_over(caplog)
    else:
        with pytest.raises(RunFolderLocked, match="`scancel 222`") as error:
            RunFolderLock(run_dir).acquire()
        assert reason in str(error.value)
    if squeue is not None:
        assert calls.read_text() == "-h -j 222 -o %T\n"


def test_a_requeued_job_waits_for_its_earlier_start_on_another_host(run_dir, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "444")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(run_dir, job="444")  # the first start's heartbeat, fresh, and never again
    caplog.set_level(logging.INFO, "runs.lock")
    start = time.monotonic()
    with RunFolderLock(run_dir, refresh_s=0.1, stale_s=0.6, wait_s=5):
        waited = time.monotonic() - start
    assert 0.5 < waited < 3
    assert "stale after 0.6 s" in took_over(caplog)
    assert any(r.getMessage().startswith("Waiting up to 5 s for host node-elsewhere") for r in caplog.records)


def test_a_requeued_job_gives_up_while_its_earlier_start_still_beats(run_dir, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "444")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    stop = threading.Event()

    def beat():
        while not stop.is_set():
            write_lock(run_dir, job="444", restart=1)
            stop.wait(0.1)

    write_lock(run_dir, job="444", restart=1)
    beating = threading.Thread(target=beat)
    beating.start()
    try:
        start = time.monotonic()
        with pytest.raises(RunFolderLocked) as error:
            RunFolderLock(run_dir, refresh_s=0.1, stale_s=0.6, wait_s=1).acquire()
        assert 1 <= time.monotonic() - start < 3
    finally:
        stop.set()
        beating.join()
    message = str(error.value)
    assert "in use by another run: host node-elsewhere" in message
    assert "It counts as alive after waiting 1 s for it to go: this job's earlier start on node-elsewhere" in message
    assert "SLURM job 444 (restart 1)" in message
    assert "`scancel 444`" in message


def test_a_requeued_job_waits_for_its_earlier_start_on_this_host(run_dir, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "444")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    caplog.set_level(logging.INFO, "runs.lock")
    with holder(run_dir, SLURM_JOB_ID="444") as process:
        threading.Timer(0.5, process.kill).start()  # a zombie until holder() reaps it: gone all the same
        start = time.monotonic()
        with RunFolderLock(run_dir, refresh_s=0.1, wait_s=5):
            waited = time.monotonic() - start
    assert 0.4 < waited < 3
    warning = took_over(caplog)
    assert f"pid {process.pid}" in warning and "SLURM job 444" in warning


def test_the_same_job_and_restart_is_this_very_job(run_dir, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "555")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    with holder(run_dir, SLURM_JOB_ID="555", SLURM_RESTART_COUNT="2") as process:
        start = time.monotonic()
        with pytest.raises(RunFolderLocked, match=f"pid {process.pid} still runs on this host"):
            RunFolderLock(run_dir, wait_s=5).acquire()
        assert time.monotonic() - start < 2
    write_lock(run_dir, job="555", restart=2, heartbeat_age_s=1000)  # on another host, silent: still this job
    with pytest.raises(RunFolderLocked, match="this very SLURM job"):
        RunFolderLock(run_dir).acquire()


def test_one_of_many_processes_takes_over_a_stale_lock(run_dir: Path, tmp_path: Path):
    for attempt in range(3):
        write_lock(run_dir, heartbeat_age_s=1000)
        go = tmp_path / f"go-{attempt}"
        contenders = [
            subprocess.Popen(
                [sys.executable, "-c", CONTEND, str(run_dir), str(go)],
                cwd=PROJECT_ROOT,
                env=_environment(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(6)
        ]
        time.sleep(0.3)  # all started and polling
        go.touch()
        outcomes = [process.stdout.readline().strip() for process in contenders]
        assert sorted(outcomes) == ["lost"] * 5 + ["won"], outcomes
        assert read_lock(run_dir)["pid"] == contenders[outcomes.index("won")].pid
        for process in contenders:
            process.stdin.close()
            process.wait(timeout=10)
        assert list(run_dir.iterdir()) == []  # no staging file or claim left behind


def test_one_of_many_threads_takes_over_a_stale_lock(run_dir: Path):
    contenders = 4
    start, done = threading.Barrier(contenders), threading.Barrier(contenders)
    outcomes: list[str] = []

    def contend():
        start.wait()
        lock = RunFolderLock(run_dir)
        try:
            lock.acquire()
            outcomes.append("won")
        except RunFolderLocked:
            outcomes.append("lost")
        done.wait()  # the winner holds until every contender has tried
        lock.release()

    for _ in range(50):
        write_lock(run_dir, heartbeat_age_s=1000)
        outcomes.clear()
        threads = [threading.Thread(target=contend) for _ in range(contenders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["lost"] * (contenders - 1) + ["won"]
        assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize(
    "body, rc",
    [
        ("lock.acquire()", 0),  # atexit releases it
        ("with lock:\n    raise ValueError('boom')", 1),
        ("lock.acquire()\nraise ValueError('boom')", 1),
    ],
)
def test_the_lock_is_removed_at_exit(run_dir: Path, body: str, rc: int):
    script = f"import sys\nfrom runs.lock import RunFolderLock\nlock = RunFolderLock(sys.argv[1])\n{body}\n"
    result = subprocess.run(
        [sys.executable, "-c", script, str(run_dir)], cwd=PROJECT_ROOT, env=_environment(), capture_output=True
    )
    assert result.returncode == rc, result.stderr
    assert list(run_dir.iterdir()) == []


def test_the_context_manager_releases_on_an_exception(run_dir: Path):
    with pytest.raises(ValueError), RunFolderLock(run_dir) as lock:
        assert lock.held and (run_dir / LOCK_NAME).exists()
        raise ValueError
    assert not lock.held and list(run_dir.iterdir()) == []


def test_a_lock_that_is_no_longer_ours_is_left_alone(run_dir: Path):
    with holder(run_dir, refresh_s=0.1) as process:
        (run_dir / LOCK_NAME).unlink()
        theirs = write_lock(run_dir)
        time.sleep(0.35)  # heartbeats are due: none may write into their lock
        assert read_lock(run_dir) == theirs
    assert read_lock(run_dir) == theirs
    log = process.stderr.read()
    assert f"The run folder lock {run_dir / LOCK_NAME} is no longer this process's (now host {FOREIGN_HOST}" in log
    assert f"Left {run_dir / LOCK_NAME} in place" in log


def test_a_run_folder_that_cannot_be_written_is_named(tmp_path: Path):
    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "file" / "run"
    with pytest.raises(RunFolderNotWritable, match=f"Cannot create the run lock in {run_dir} "):
        RunFolderLock(run_dir).acquire()


def test_a_read_only_run_folder_is_named(run_dir: Path):
    """As root, without the capabilities that let root write anywhere."""
    run_dir.mkdir(mode=0o555)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] if os.geteuid() == 0 else []
    if drop and not shutil.which("setpriv"):
        pytest.skip("root writes anywhere, and setpriv (util-linux) is missing to drop that")
    script = "import sys\nfrom runs.lock import RunFolderLock\nRunFolderLock(sys.argv[1]).acquire()\n"
    result = subprocess.run(
        [*drop, sys.executable, "-c", script, str(run_dir)],
        cwd=PROJECT_ROOT,
        env=_environment(),
        capture_output=True,
        text=True,
    )
    assert f"RunFolderNotWritable: Cannot create the run lock in {run_dir} (Permission denied)" in result.stderr
    assert list(run_dir.iterdir()) == []
