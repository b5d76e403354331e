"""The prepare/index step: check every image file once, in parallel, and keep the bad ones out of training.

DALI has no skip-bad-sample option (one unreadable file is a fatal pipeline error), so files are checked before
training and only the good ones reach the pipelines. Results are cached per file (size, mtime) in the cache
folder, saved as the scan goes, so a second run, or one resumed after an interruption, checks only what changed.

In a job of several ranks one rank indexes (local rank 0 of each node, or global rank 0: ``IndexRole``) and writes
the indexed layout to the cache folder; the others wait for it there and read it, without a look at the dataset.
There is no process group yet at that point (the layout sizes the run before ``fit``), so the cache folder is the
only channel: a lock for the indexing ranks, and a marker per run naming the result's SHA-256.

    python -m data.index /datasets/ILSVRC2012 [--mode fast|full] [--workers 16]

fast: the header parses as a JPEG or PNG, and the file is whole (ends with its end marker, or else decodes).
full: every loader's decoder decodes it (torchvision's and DALI's): such a file never stops a loader.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.ilsvrc import ILSVRCLayout, Split, load_layout
from data.spec import ImageSpec

log = logging.getLogger(__name__)

MODES = ("none", "fast", "full")
FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}  # MPO: phones' multi-picture JPEG (a JPEG first)
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
SAVE_EVERY_S = 30.0
STAT_THREADS = 32  # stat waits on a network file system's round trip: threads overlap them
SCOPES = ("node", "job")
RUN_ENV = "IMAGENET_PIPELINE_RUN"  # the run token that Lightning's launcher's children inherit (job_run_token)
POLL_S = 0.5
MARKER_MAX_AGE_S = 7 * 24 * 3600  # a run's marker is read at its start only; older ones are deleted


def usable_cores() -> int:
    """The cores this process may run on (its CPU binding: srun --cpu-bind, taskset), not all the node's."""
    return len(os.sched_getaffinity(0))


def check_image(path: str, full: bool) -> str:
    """'ok', or why the file cannot be trained on. ``full``: every loader's decoder must decode it (torchvision's
    and DALI's). Fast: the header parses as a JPEG or PNG and the file ends with its end marker; one whose end
    marker is elsewhere (a trailer appended by a phone, or a truncated file) is decided by decoding it."""
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            fmt = FORMATS.get(image.format)
            if fmt is None:
                return f"{image.format} is not a JPEG or PNG"
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))  # some writers pad after the marker
            ends = END_MARKERS[fmt] in f.read()
        failure = _decoding_failure(path, with_dali=full) if full or not ends else None
        if failure is None:
            return "ok"
        return failure if ends else f"truncated {fmt} (no end marker, and {failure})"
    except UnidentifiedImageError:
        return "not an image file"
    except (OSError, SyntaxError, ValueError) as error:
        return f"cannot be read: {error}".replace("\t", " ").replace("\n", " ")


def _decoding_failure(path: str, with_dali: bool) -> str | None:
    """Why a loader's decoder cannot decode the file: torchvision's (the torchvision loader, predict.py), and with
    ``with_dali`` DALI's CPU decoder (the DALI loader); None where they all can."""
    from data.torchvision_backend import decode  # here: most files need no decoder, and CLIs start without torch

    try:
        decode(path, ImageSpec())
    except RuntimeError as error:
        return f"torchvision cannot decode it: {str(error).splitlines()[-1].split(', ')[-1]}"
    if with_dali:
        import nvidia.dali.experimental.dynamic as ndd  # here: a fast check need not load DALI
        from nvidia.dali import types

        data = np.fromfile(path, dtype=np.uint8)
        try:
            ndd.decoders.image(ndd.as_tensor(data), device="cpu", output_type=types.RGB)
        except RuntimeError as error:
            return f"DALI cannot decode it: {str(error).strip().splitlines()[-1]}"
    return None


def _check_many(paths: list[str], full: bool) -> list[str]:
    return [check_image(p, full) for p in paths]


class IndexCache:
    """path -> (size, mtime_ns, verdict) for one dataset root and mode, saved atomically as TSV."""

    def __init__(self, cache_dir: Path, root: Path, mode: str) -> None:
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        self.path = cache_dir / "index" / f"{digest}-{mode}.tsv"
        self.entries: dict[str, tuple[int, int, str]] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                path, size, mtime, verdict = line.split("\t")
                self.entries[path] = (int(size), int(mtime), verdict)

    def verdict(self, path: str, stat: os.stat_result) -> str | None:
        entry = self.entries.get(path)
        return entry[2] if entry and entry[:2] == (stat.st_size, stat.st_mtime_ns) else None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(f".{os.getpid()}.partial")
        staging.write_text("".join(f"{p}\t{s}\t{m}\t{v}\n" for p, (s, m, v) in self.entries.items()), encoding="utf-8")
        os.replace(staging, self.path)


def _stat_all(paths: list[str]) -> list[os.stat_result]:
    return [os.stat(p) for p in paths]


def file_stats(paths: list[str]) -> dict[str, os.stat_result]:
    """``os.stat`` of every path, in threads: on a network file system each is a round trip, which threads overlap."""
    chunks = [paths[i : i + 1024] for i in range(0, len(paths), 1024)]
    with ThreadPoolExecutor(STAT_THREADS) as pool:
        return dict(zip(paths, itertools.chain.from_iterable(pool.map(_stat_all, chunks))))


def index_files(paths: list[str], cache: IndexCache, full: bool, workers: int) -> dict[str, str]:
    """Verdict for every path, checking in parallel only those the cache does not know in their current state."""
    stats = file_stats(paths)
    verdicts = {p: cache.verdict(p, stats[p]) for p in paths}
    todo = [p for p, v in verdicts.items() if v is None]
    if todo:
        chunks = [todo[i : i + 256] for i in range(0, len(todo), 256)]
        last_save = time.monotonic()
        with (
            # full: spawned, not forked: a forked copy of a process that runs DALI's threads can hang in DALI's decoder
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn" if full else "fork")) as pool,
            tqdm(
                total=len(todo),
                desc=f"Checking images ({'decode' if full else 'headers'})",
                unit="img",
                mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
            ) as progress,
        ):
            for chunk, results in zip(chunks, pool.map(_check_many, chunks, [full] * len(chunks))):
                for path, verdict in zip(chunk, results):
                    verdicts[path] = verdict
                    cache.entries[path] = (stats[path].st_size, stats[path].st_mtime_ns, verdict)
                progress.update(len(chunk))
                if time.monotonic() - last_save > SAVE_EVERY_S:  # an interrupted scan resumes from here
                    cache.save()
                    last_save = time.monotonic()
        cache.save()
    return verdicts


def _keep(split: Split, verdicts: dict[str, str]) -> Split:
    kept = [(p, label) for p, label in zip(split.paths, split.labels) if verdicts[p] == "ok"]
    return Split([p for p, _ in kept], [label for _, label in kept])


def indexed_layout(layout: ILSVRCLayout, mode: str, cache_dir: str | os.PathLike, workers: int) -> ILSVRCLayout:
    """``layout`` without the files that fail the ``mode`` check, each exclusion logged with its reason."""
    return checked_layout(layout, mode, cache_dir, workers)[0]


def checked_layout(
    layout: ILSVRCLayout, mode: str, cache_dir: str | os.PathLike, workers: int
) -> tuple[ILSVRCLayout, dict[str, str]]:
    """``layout`` without the files that fail the ``mode`` check, and those files (path as in ``layout``) with their
    reasons, each exclusion logged: for a tool that records what it left out (data/shards.py's manifest)."""
    if mode not in MODES:
        raise ValueError(f"data.index must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return layout, {}
    cache = IndexCache(Path(cache_dir).expanduser(), layout.root, mode)
    verdicts = index_files(layout.train.paths + layout.val.paths, cache, mode == "full", workers)
    excluded = {p: v for p, v in verdicts.items() if v != "ok"}
    for path, reason in sorted(excluded.items()):
        log.warning("Excluded %s: %s", path, reason)
    if excluded:
        reasons = Counter(reason.split(":")[0] for reason in excluded.values())
        log.warning(
            "Excluded %d of %d files (%s); verdicts cached in %s",
            len(excluded),
            len(verdicts),
            ", ".join(f"{n} {r}" for r, n in reasons.most_common()),
            cache.path,
        )
    return replace(layout, train=_keep(layout.train, verdicts), val=_keep(layout.val, verdicts)), excluded


class IndexWaitError(RuntimeError):
    """A rank waiting for the indexing rank's result got none: that rank failed, or did not finish in time."""


@dataclass(frozen=True)
class IndexRole:
    """Who indexes the dataset, and who reads the result from the cache folder. ``scope``: ``node``, local rank 0 of
    each node indexes (a cache folder per node, or a shared one); ``job``, global rank 0 does (the cache folder must
    be on a file system every node shares). ``run``: what all ranks of this job share and no other job does, so that
    no rank trusts an earlier run's result. A process alone (the default) indexes and tells no one."""

    global_rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    scope: str = "node"
    run: str = ""

    @property
    def indexes(self) -> bool:
        return (self.local_rank if self.scope == "node" else self.global_rank) == 0

    @property
    def indexer(self) -> str:
        """The rank that indexes for this one, in words."""
        return f"local rank 0 on {socket.gethostname()}" if self.scope == "node" else "global rank 0"

    @property
    def group(self) -> str:
        """What the ranks that share one indexing rank have in common."""
        return socket.gethostname() if self.scope == "node" else "job"


def job_run_token(starts_the_ranks: bool) -> str:
    """What every rank of this job shares and a later job does not. A process that starts the other ranks itself
    (Lightning's DDP subprocess launcher) makes one up before it does, and they inherit it with its environment;
    ranks that srun or torchrun started take their launcher's job, step, run and restart numbers. Where none of these
    names the job (Lightning's launcher on several nodes with data.index_scope=job), set IMAGENET_PIPELINE_RUN to a
    value of the job's own on every node."""
    env = os.environ
    if starts_the_ranks and RUN_ENV not in env:
        env[RUN_ENV] = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
    if RUN_ENV in env:
        return env[RUN_ENV]
    if "SLURM_JOB_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', '')}-{env.get('SLURM_RESTART_COUNT', '0')}"
    rendezvous = f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"
    if "TORCHELASTIC_RUN_ID" in env:
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}-{rendezvous}"
    return rendezvous


def _write_atomically(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    staging.write_bytes(data)
    os.replace(staging, path)


class IndexBoard:
    """The files in the cache folder through which one rank hands its indexed layout of ``root`` to the others: a
    lock the indexing ranks take in turn, the layout (one per root and mode), and a marker per run and group of ranks
    that names the layout's SHA-256, or the indexing rank's error. Named from the root as configured (no ``stat`` of
    it: a waiting rank looks at nothing in the dataset)."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        root: str | os.PathLike,
        mode: str,
        role: IndexRole,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.cache_dir, self.root, self.mode, self.role = Path(cache_dir).expanduser(), root, mode, role
        self.folder = self.cache_dir / "index"
        name = f"{hashlib.sha1(os.path.abspath(os.path.expanduser(root)).encode()).hexdigest()[:12]}-{mode}"
        if classes is not None:  # a class subset's layout is another file: jobs on other subsets share the folder
            name += "-" + hashlib.sha1("\n".join(sorted(classes)).encode()).hexdigest()[:12]
        run = hashlib.sha1(f"{role.run}\0{role.group}".encode()).hexdigest()[:12]
        self.lock_path = self.folder / f"{name}.lock"
        self.layout_path = self.folder / f"{name}.layout.json"
        self.marker_path = self.folder / f"{name}.run-{run}.done"

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Held while indexing: a second indexing rank of the dataset (another node's on a shared cache folder,
        another job's) waits, and then finds the verdicts cached."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("Waiting for %s: another process indexes %s", self.lock_path, self.root)
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError as error:  # a file system without flock (Lustre without -o flock)
                log.warning("Indexing without the lock %s (%s): concurrent indexers each check", self.lock_path, error)
            yield

    def publish(self, layout: ILSVRCLayout, seconds: float) -> None:
        data = json.dumps(layout.as_record(), separators=(",", ":")).encode()
        _write_atomically(self.layout_path, data)
        marker = {"sha256": hashlib.sha256(data).hexdigest(), "indexer": self.role.indexer, "seconds": seconds}
        _write_atomically(self.marker_path, json.dumps(marker).encode())
        for old in self.folder.glob("*.done"):
            with suppress(FileNotFoundError):  # another indexer's clean-up got there first
                if time.time() - old.stat().st_mtime > MARKER_MAX_AGE_S:
                    old.unlink()

    def publish_failure(self, error: BaseException) -> None:
        """Tells the waiting ranks why there is no layout, so that they stop at once with the reason."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.marker_path, json.dumps({"error": f"{type(error).__name__}: {error}"}).encode())

    def wait(self, wait_s: float) -> ILSVRCLayout:
        """The layout the indexing rank publishes in this run, once it has."""
        start = time.monotonic()
        while not self.marker_path.is_file():
            if time.monotonic() - start > wait_s:
                raise IndexWaitError(
                    f"Rank {self.role.global_rank} waited {wait_s:g} s (data.index_wait_s) for {self.role.indexer} "
                    f"to index {self.root} into {self.folder}, and this run's result ({self.marker_path.name}) is "
                    "not there: see that rank's log (is it still checking files, or did it stop?), raise "
                    f"data.index_wait_s, or index before the job: python -m data.index {self.root} --mode "
                    f"{self.mode} --cache-dir {self.cache_dir}"
                )
            time.sleep(POLL_S)
        marker = json.loads(self.marker_path.read_text())
        if "error" in marker:
            raise IndexWaitError(f"{self.role.indexer} could not index {self.root}: {marker['error']}")
        data = self.layout_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != marker["sha256"]:
            raise IndexWaitError(
                f"{self.layout_path} changed after {self.role.indexer} wrote it for this run (another job indexed "
                f"{self.root} since, and found other files): start the job again"
            )
        log.info(
            "Rank %d read the index of %s from %s after waiting %.1f s for %s (who took %.1f s)",
            self.role.global_rank,
            self.root,
            self.layout_path,
            time.monotonic() - start,
            self.role.indexer,
            marker["seconds"],
        )
        return ILSVRCLayout.from_record(self.root, json.loads(data))


def shared_layout(
    root: str | os.PathLike,
    mode: str,
    cache_dir: str | os.PathLike,
    workers: int,
    role: IndexRole = IndexRole(),
    wait_s: float = 3600.0,
    classes: Sequence[str] | None = None,
    scan: Callable[[str | os.PathLike], ILSVRCLayout] = load_layout,
) -> ILSVRCLayout:
    """The scanned (``scan``: the ILSVRC folders, or an evaluation set's) and checked layout of ``root``, of its
    ``classes`` only where given (only their files are checked): made here by a process alone or by its job's indexing
    rank (which publishes it in the cache folder), read from there by the other ranks once it is published, without a
    look at the dataset (a scan and a ``stat`` of 1.28 M files per rank would cost each minutes)."""

    def checked() -> ILSVRCLayout:
        layout = scan(root)
        return indexed_layout(layout if classes is None else layout.subset(classes), mode, cache_dir, workers)

    if role.world_size == 1:
        return checked()
    board = IndexBoard(cache_dir, root, mode, role, classes)
    if not role.indexes:
        return board.wait(wait_s)
    log.info("Rank %d (%s) indexes %s for the ranks of the %s", role.global_rank, role.indexer, root, role.scope)
    start = time.monotonic()
    with board.lock():
        try:
            layout = checked()
        except BaseException as error:
            board.publish_failure(error)
            raise
        board.publish(layout, time.monotonic() - start)
    log.info("Indexed %s in %.1f s; the other ranks read it from %s", root, time.monotonic() - start, board.layout_path)
    return layout


def default_cache_dir() -> Path:
    """The cache folder training uses by default (conf/paths/default.yaml), so that a CLI shares its verdicts."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "imagenet-pipeline"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--mode", choices=MODES[1:], default="fast")
    parser.add_argument("--workers", type=int, default=usable_cores())
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layout = indexed_layout(load_layout(args.root), args.mode, args.cache_dir, args.workers)
    print(layout.summary())


if __name__ == "__main__":
    main()
