"""One run folder, one job. Runs resume from the newest checkpoint in their folder, so two processes can meet in one
(a job submitted twice, a requeued job whose earlier tasks still write from a node SLURM declared dead) and would
overwrite each other's checkpoints. Global rank 0 holds ``<run_dir>/run.lock`` while it trains; a second run stops
with the holder's name, unless the holder is gone:

- on this host, its pid no longer runs, is a zombie, or is another process (its start time in /proc differs), or
  the host has rebooted since (boot id);
- its SLURM job is not ours and ``squeue`` says it no longer runs (squeue's word beats the heartbeat either way;
  without an answer from squeue, the heartbeat rule below decides);
- a requeued start of its own job (same job id, a higher SLURM_RESTART_COUNT) waits, up to ``wait_s``, for the
  earlier start to go: its pid on this host, its heartbeat going stale on another one;
- on another host, its heartbeat is older than ``stale_s`` (a crashed machine); the same job id and restart count
  there is this very job, alive.

The heartbeat is written in place through the holder's own descriptor, never by replacing the file, so a holder
that was taken over cannot bring its lock back; it logs an error instead. Host clocks must agree (NTP) to well
within ``stale_s``. The lock is created by ``link``, which is atomic on NFS too.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
# squeue states in which a job's processes may still run (everything else: it ended, or waits to start again)
SQUEUE_ALIVE = frozenset(
    {"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
)
SQUEUE_TIMEOUT_S = 30.0


class RunFolderLocked(RuntimeError):
    """Another live run holds the run folder; the message names it and how to go on."""


class RunFolderNotWritable(RuntimeError):
    """The run folder cannot hold the lock file; the message names the path."""


def _stamp(seconds: float) -> str:
    """UTC, fixed width: a heartbeat rewritten in place keeps the file's length."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def _readable(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of ``pid``, None when /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[19])


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _own_record(now: float) -> dict[str, Any]:
    restart = os.environ.get("SLURM_RESTART_COUNT")
    stat = _proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_time": stat[1] if stat else None,
        "boot_id": _boot_id(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(restart) if restart else None,
        "taken_at": _stamp(now),
        "heartbeat_at": _stamp(now),
    }


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, indent=1) + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)  # other NFS clients see it on their next open


def _process_gone(record: dict[str, Any]) -> str | None:
    """Why the holder on this host is gone, or None while its process runs."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return "its lock names no pid"
    if record.get("boot_id") and record["boot_id"] != _boot_id():
        return "this host has rebooted since it took the lock"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} no longer runs on this host"
    except PermissionError:  # another user's process: alive
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return None
    state, started = stat
    if state in ("Z", "X"):
        return f"pid {pid} has exited (a zombie)"
    if record.get("start_time") is not None and started != record["start_time"]:
        return f"pid {pid} is now another process (started at tick {started}, the holder at {record['start_time']})"
    return None


def _squeue_state(job_id: str) -> str | None:
    """The job's state as squeue prints it, "" when squeue no longer knows it, None when squeue cannot tell."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        log.info("squeue cannot tell whether SLURM job %s runs (%s): judging its lock by the heartbeat", job_id, error)
        return None
    if result.returncode != 0:
        if "invalid job id" in result.stderr.lower():
            return ""
        log.info("squeue -j %s failed (%s): judging its lock by the heartbeat", job_id, result.stderr.strip())
        return None
    lines = result.stdout.split()
    return lines[0] if lines else ""


@dataclass(frozen=True)
class _Holder:
    """The lock file as read: its record, its bytes (what a takeover claims) and its last heartbeat."""

    record: dict[str, Any]
    data: bytes
    heartbeat: float

    def describe(self) -> str:
        record, age = self.record, time.time() - self.heartbeat
        if not record:
            return f"an unreadable lock file, last written {_readable(self.heartbeat)} ({age:.0f} s ago)"
        beat = f"last heartbeat {_readable(self.heartbeat)} ({age:.0f} s ago)"
        job, restart = record.get("slurm_job_id"), record.get("slurm_restart_count")
        slurm = f", SLURM job {job}" if job else ""
        slurm += f" (restart {restart})" if job and restart else ""
        since = _readable(_seconds(record["taken_at"]))
        return f"host {record.get('host')}, pid {record.get('pid')}{slurm}, since {since}, {beat}"

    def stop_command(self) -> str:
        job = self.record.get("slurm_job_id")
        return f"scancel {job}" if job else f"kill {self.record.get('pid')} on {self.record.get('host')}"


@dataclass(frozen=True)
class _Verdict:
    state: str  # GONE, WAIT (a requeued start waits for its earlier one) or ALIVE
    reason: str


GONE, WAIT, ALIVE = "gone", "wait", "alive"


class RunFolderLock:
    """``<run_dir>/run.lock``, held by global rank 0 of the run that writes ``run_dir`` (the caller decides who
    takes it). ``refresh_s``: heartbeat period; ``stale_s`` (default 3 x refresh_s): a holder on another host silent
    this long is gone; ``wait_s``: how long a requeued start waits for its earlier start to go."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        refresh_s: float = 30.0,
        stale_s: float | None = None,
        wait_s: float = 300.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.refresh_s, self.wait_s = refresh_s, wait_s
        self.stale_s = 3 * refresh_s if stale_s is None else stale_s
        if self.stale_s <= refresh_s:
            raise ValueError(f"stale_s={self.stale_s:g} must exceed refresh_s={refresh_s:g}, or a live holder is stale")
        self._fd: int | None = None
        self._owner_pid = 0
        self._record: dict[str, Any] = {}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, taking it over from a holder that is gone; raise RunFolderLocked while one lives."""
        if self.held:
            return
        self._record = _own_record(time.time())
        deadline, waiting = time.monotonic() + self.wait_s, False
        while not self._create():
            holder = self._read()
            if holder is None:  # released between our attempt and the read
                continue
            verdict = self._judge(holder)
            if verdict.state == GONE:
                if self._take_over(holder):
                    log.warning("Took over the run lock %s from %s: %s", self.path, holder.describe(), verdict.reason)
                    break
                time.sleep(0.01)  # another contender is taking it over
                continue
            if verdict.state == WAIT and time.monotonic() < deadline:
                if not waiting:
                    log.info("Waiting up to %g s for %s to go: %s", self.wait_s, holder.describe(), verdict.reason)
                    waiting = True
                time.sleep(min(self.refresh_s, 5.0))
                continue
            raise RunFolderLocked(self._message(holder, verdict, waited=self.wait_s if verdict.state == WAIT else 0))
        self._owner_pid = os.getpid()
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.release)
        log.info("Holding the run folder lock %s", self.path)

    def release(self) -> None:
        """Remove the lock file if it is still ours (another run may have taken it over); idempotent."""
        if self._fd is None or os.getpid() != self._owner_pid:  # a forked child does not own its parent's lock
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            if self._is_ours():
                self.path.unlink()
            else:
                log.warning("Left %s in place: it is no longer this process's lock", self.path)
        finally:
            os.close(self._fd)
            self._fd = None
            atexit.unregister(self.release)

    def _staged(self) -> tuple[int, Path]:
        """Our record in a file of our own beside the lock, open for the heartbeat."""
        staging = self.run_dir / f".{LOCK_NAME}.{self._record['host']}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            raise RunFolderNotWritable(
                f"Cannot create the run lock in {self.run_dir} ({error.strerror or error}): the run folder must be "
                "writable by this job; check its permissions and mount, or choose another (hydra.run.dir, run_id)."
            ) from error
        try:
            _write_record(fd, self._record)
        except OSError as error:
            os.close(fd)
            staging.unlink()
            raise RunFolderNotWritable(f"Cannot write the run lock in {self.run_dir}: {error}") from error
        return fd, staging

    def _link(self, staging: Path, name: Path) -> bool:
        """``link``, the NFS way: a lost reply to a link that succeeded reads as EEXIST, so the link count decides."""
        try:
            os.link(staging, name)
        except FileExistsError:
            pass
        return os.stat(staging).st_nlink == 2

    def _create(self) -> bool:
        return self._publish(lambda staging: self._link(staging, self.path))

    def _take_over(self, stale: _Holder) -> bool:
        """Replace the stale lock; of the contenders that judged these very bytes stale, only the one whose claim
        (a name made from them) links first proceeds, and only while the lock still holds them."""
        claim = self.run_dir / f".{LOCK_NAME}.takeover-{hashlib.sha1(stale.data).hexdigest()[:16]}"

        def claim_then_replace(staging: Path) -> bool:
            if not self._link(staging, claim):
                self._clear_abandoned(claim)
                return False
            try:
                current = self.path.read_bytes()
            except FileNotFoundError:
                current = None
            if current != stale.data:  # released, or rewritten: its holder lives after all
                claim.unlink()
                return False
            os.rename(claim, self.path)
            return True

        return self._publish(claim_then_replace)

    def _publish(self, publish: Callable[[Path], bool]) -> bool:
        """Stages this process's record and runs ``publish`` on it; the staged descriptor becomes the lock's (its
        heartbeat writes through it) where ``publish`` won, and is closed otherwise."""
        fd, staging = self._staged()
        won = False
        try:
            won = publish(staging)
            return won
        finally:
            staging.unlink()
            if won:
                self._fd = fd
            else:
                os.close(fd)

    def _clear_abandoned(self, claim: Path) -> None:
        """A claim lives for milliseconds; one older than ``stale_s`` was left by a contender that died taking over."""
        try:
            if time.time() - claim.stat().st_mtime > self.stale_s:
                claim.unlink()
        except FileNotFoundError:
            pass

    def _read(self) -> _Holder | None:
        """The lock as it stands, None if there is none; an unreadable one is judged by its file's age."""
        for _ in range(3):
            try:
                with open(self.path, "rb") as file:
                    data, written = file.read(), os.fstat(file.fileno()).st_mtime
            except FileNotFoundError:
                return None
            try:
                record = json.loads(data)
                _seconds(record["taken_at"])
                return _Holder(record, data, _seconds(record["heartbeat_at"]))
            except (ValueError, KeyError, TypeError):
                time.sleep(0.05)  # caught mid-write
        return _Holder({}, data, written)

    def _judge(self, holder: _Holder) -> _Verdict:
        record, ours = holder.record, self._record
        job = record.get("slurm_job_id")
        same_job = job is not None and job == ours["slurm_job_id"]
        requeued = same_job and (ours["slurm_restart_count"] or 0) > (record.get("slurm_restart_count") or 0)
        if record.get("host") == ours["host"]:
            gone = _process_gone(record)
            if gone:
                return _Verdict(GONE, gone)
            if requeued:
                return _Verdict(WAIT, f"pid {record['pid']}, this job's earlier start, still runs on this host")
            return _Verdict(ALIVE, f"pid {record['pid']} still runs on this host")
        if job is not None and not same_job:
            state = _squeue_state(str(job))
            if state in SQUEUE_ALIVE:
                return _Verdict(ALIVE, f"squeue says SLURM job {job} is {state}")
            if state is not None:
                return _Verdict(GONE, f"squeue says SLURM job {job} is {state or 'no longer known'}")
        if same_job and not requeued:
            return _Verdict(ALIVE, "it is this very SLURM job (same job id and restart count) on another host")
        age = time.time() - holder.heartbeat
        if age > self.stale_s:
            return _Verdict(GONE, f"its heartbeat is {age:.0f} s old (stale after {self.stale_s:g} s): its host died")
        if requeued:
            return _Verdict(WAIT, f"this job's earlier start on {record['host']} still beats ({age:.0f} s ago)")
        return _Verdict(ALIVE, f"its heartbeat is {age:.0f} s old (stale after {self.stale_s:g} s)")

    def _message(self, holder: _Holder, verdict: _Verdict, waited: float) -> str:
        after = f" after waiting {waited:g} s for it to go" if waited else ""
        return (
            f"The run folder {self.run_dir} is in use by another run: {holder.describe()}. It counts as alive{after}: "
            f"{verdict.reason}. Two runs in one folder overwrite each other's checkpoints: wait for it to end, stop it "
            f"(`{holder.stop_command()}`), or start this run in another run folder (run_id=<another name>); if you "
            f"know it is gone, delete {self.path}."
        )

    def _is_ours(self) -> bool:
        try:
            named, own = os.stat(self.path), os.fstat(self._fd)
        except FileNotFoundError:
            return False
        return (named.st_dev, named.st_ino) == (own.st_dev, own.st_ino)

    def _beat(self) -> None:
        """Refresh the heartbeat in place; stop, loudly, once the lock is no longer ours."""
        while not self._stop.wait(self.refresh_s):
            try:
                if not self._is_ours():
                    holder = self._read()
                    log.error(
                        "The run folder lock %s is no longer this process's (now %s): another run may write to %s",
                        self.path,
                        holder.describe() if holder else "removed",
                        self.run_dir,
                    )
                    return
                _write_record(self._fd, {**self._record, "heartbeat_at": _stamp(time.time())})
            except OSError as error:
                log.warning("Could not refresh the heartbeat in %s: %s", self.path, error)
