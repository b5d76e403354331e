"""Folders against shards on 20,000 real ILSVRC JPEGs: images/s with a warm and a cold page cache, and the files
each reader opens per epoch, counted.

    python -m benchmarks.shard_io [--workdir /tmp/shard_io] [--epochs 2] [--batch 100] [--json F] [--clean]
        [--sources folders shards] [--readers python dali-reader dali torchvision]

WORKDIR gets, once (reused if present): ``folders/train/<wnid>/<wnid>_<i>.JPEG``, ``--copies`` COPIES of each of
the 1000 samples in ../shared (not links: hard links share one inode and its cached pages, so evicting or opening
one would evict or open all its copies; symbolic links add an open-by-name of the target), one per class in
``folders/val``; and ``shards/``, that layout converted by ``python -m data.shards`` (``--shard-samples`` each).

Readers, each over the 20,000 train images with as many threads or workers as the process has cores (``python``
and ``dali-reader``: the bytes only, no decoding, the I/O on its own, which decoding on a few cores hides; ``dali``
and ``torchvision``: the project's train loaders, decoding random-resized crops to 224 px on the CPU). Each reader
is built, reads one untimed epoch, then ``--epochs`` pairs of a warm epoch and a cold one. Cold: ``os.sync()``,
then ``madvise(MADV_DONTNEED)`` on this process's mappings of the source's files (DALI keeps its tars mapped, and
``fadvise`` leaves mapped pages cached) and ``posix_fadvise(POSIX_FADV_DONTNEED)`` on each file: no privileges.
``mincore`` tells the share of the source's bytes cached as each epoch starts (0% cold, 100% warm, or reported).

Counting: inotify's IN_OPEN events on every folder of the source (any process: DataLoader workers, DALI threads),
drained by a thread so that the kernel's queue never overflows. An epoch's count runs from the settled end of the
previous epoch (no open for 0.3 s: a DALI pipeline reads ahead into the next epoch until its queue is full) to its
own, less this benchmark's own opens (eviction and the residency check open each file of the source once each).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import select
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from nvidia.dali import pipeline_def

from benchmarks.suite import machine
from data.dali import DaliLoaders
from data.dali import reader as dali_train_reader  # the train loader's own reader, nothing after it
from data.ilsvrc import Split, load_layout
from data.placement import BatchRequest, Placement, Shard
from data.shard_set import ShardSet, ShardSplit, is_shard_set, read_member
from data.spec import ImageSpec
from data.torchvision_backend import EpochSeededSampler, TorchvisionLoaders

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = PROJECT_ROOT.parent / "shared" / "data" / "imagenet-samples"
KINDS = {".jpeg": "images", ".jpg": "images", ".tar": "shards", ".idx": "index"}
FILE_KINDS = ("images", "shards", "index", "other")

IN_OPEN, IN_Q_OVERFLOW, IN_ISDIR = 0x20, 0x4000, 0x40000000
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = os.sysconf("SC_PAGE_SIZE")


def kind(name: str | os.PathLike) -> str:
    """What a dataset file is, by its suffix: ``images``, ``shards`` (tars), ``index`` (DALI's) or ``other``."""
    return KINDS.get(os.path.splitext(os.fsdecode(name))[1].lower(), "other")


def _check(result: int, call: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")
    return result


class OpenCounter:
    """Opens of files in the folders under ``roots``, by kind, from inotify's IN_OPEN events: every process's
    (no privileges, no tracing). A thread drains the kernel's queue so that it does not overflow (an overflow is an
    error, not a lower count). The kernel merges an event with the one before it when both are the same file's and
    the first is still unread: two threads opening one file at the same moment count once, a lower bound there;
    a file opened once per epoch is counted exactly. Opening a folder counts as ``directories``."""

    def __init__(self, roots: Iterable[str | os.PathLike]) -> None:
        self.fd = _check(_libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
        self.counts: Counter[str] = Counter()
        self.overflowed = False
        self.lock = threading.Lock()
        try:
            for root in roots:
                for folder, _, _ in os.walk(root):
                    _check(
                        _libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_OPEN), f"inotify_add_watch {folder}"
                    )
        except OSError:
            os.close(self.fd)
            raise
        self.stop_read, self.stop_write = os.pipe()
        self.thread = threading.Thread(target=self._run, name="open-counter", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            offset = 0
            while offset < len(data):
                _, mask, _, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
                offset += EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    self.overflowed = True
                elif mask & IN_OPEN:
                    self.counts["directories" if mask & IN_ISDIR else kind(name)] += 1

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.stop_read, select.POLLIN)
        while all(fd != self.stop_read for fd, _ in poller.poll()):
            with self.lock:
                self._drain()

    def snapshot(self) -> Counter[str]:
        """The opens so far: every open made before this call is in it (the kernel queues an event at the open)."""
        with self.lock:
            self._drain()
            if self.overflowed:
                raise RuntimeError("inotify's event queue overflowed: opens were lost (fs.inotify.max_queued_events)")
            return Counter(self.counts)

    def settled(self, quiet: float = 0.3) -> Counter[str]:
        """The opens so far, once none has come for ``quiet`` seconds: a DALI pipeline keeps reading ahead after the
        batch it handed over until its prefetch queue is full, so an epoch counted from one settled point to the
        next holds exactly one epoch's opens, whatever the queue's depth."""
        before = self.snapshot()
        while True:
            time.sleep(quiet)
            now = self.snapshot()
            if now == before:
                return now
            before = now

    def close(self) -> None:
        os.write(self.stop_write, b"x")
        self.thread.join()
        for fd in (self.fd, self.stop_read, self.stop_write):
            os.close(fd)

    def __enter__(self) -> OpenCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def files_opened(counts: Counter[str]) -> int:
    """Files, not folders, in an ``OpenCounter`` count."""
    return sum(counts[k] for k in FILE_KINDS)


def unmap_pages(paths: Sequence[str | os.PathLike]) -> None:
    """``madvise(MADV_DONTNEED)`` on this process's mappings of the files: ``fadvise`` leaves a mapped page cached,
    and DALI keeps every tar mapped while its pipeline lives (``readers.file``, its last ~100 files). The mapping
    stays valid: the next access reads the file again. Other processes' mappings are out of reach."""
    wanted = {os.path.realpath(path) for path in paths}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") in wanted:
                start, end = (int(address, 16) for address in fields[0].split("-"))
                _check(_libc.madvise(start, end - start, mmap.MADV_DONTNEED), f"madvise {fields[5].strip()}")


def evict(paths: Sequence[str | os.PathLike]) -> Counter[str]:
    """Drops the files' pages from the page cache: written back first (``DONTNEED`` leaves dirty pages), unmapped
    from this process, then dropped; returns the opens it made, by kind, for the counter to discount. Dentries and
    inodes stay cached: only data pages go."""
    os.sync()
    unmap_pages(paths)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return Counter(kind(path) for path in paths)


def resident_bytes(path: str | os.PathLike) -> tuple[int, int]:
    """(bytes of the file in the page cache, its size), from ``mincore`` on a mapping that touches no page."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == ctypes.c_void_p(-1).value:
            _check(-1, f"mmap {path}")
        try:
            pages = ctypes.create_string_buffer(-(-size // PAGE))
            _check(_libc.mincore(address, size, pages), f"mincore {path}")
            return min(size, sum(byte & 1 for byte in pages.raw) * PAGE), size
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def resident_share(paths: Sequence[str | os.PathLike]) -> tuple[float, Counter[str]]:
    """The share of the files' bytes in the page cache, and the opens it made (one per file), by kind."""
    cached = total = 0
    for path in paths:
        resident, size = resident_bytes(path)
        cached, total = cached + resident, total + size
    return cached / max(total, 1), Counter(kind(path) for path in paths)


def copy_layout(samples: Sequence[Path], root: Path, copies: int) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG``: ``copies`` copies of each sample (its own inode and pages), and one per
    class in ``root/val/<wnid>/``: an ILSVRC layout. Built once: a finished one is marked and reused."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{len(samples)} x {copies}\n":
        return root
    for split, count in (("train", copies), ("val", 1)):
        for sample in samples:
            wnid = sample.name.split("_", 1)[0]
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shutil.copyfile(sample, folder / f"{wnid}_{i}{sample.suffix}")
    os.sync()
    done.write_text(f"{len(samples)} x {copies}\n")
    return root


def convert(root: Path, out: Path, shard_samples: int, workers: int) -> Path:
    """``root`` as a shard set in ``out`` (``python -m data.shards``), unless one is there already."""
    if not is_shard_set(out):
        command = [sys.executable, "-m", "data.shards", str(root), str(out), "--shard-samples", str(shard_samples)]
        options = ["--workers", str(workers), "--seed", "0", "--cache-dir", str(out.parent / "index-cache")]
        subprocess.run([*command, *options], cwd=PROJECT_ROOT, check=True)
        os.sync()
    return out


@dataclass
class Reader:
    """One way of reading a source's train split: ``epoch(n)`` reads epoch ``n`` whole and returns its image count;
    ``files``: what eviction drops before a cold epoch."""

    source: str
    files: list[str]
    name: str
    epoch: Callable[[int], int]
    close: Callable[[], None] = lambda: None


def _source(split: Split | ShardSplit) -> tuple[str, list[str]]:
    if isinstance(split, Split):
        return "folders", list(split.paths)
    return "shards", split.tar_paths + split.index_paths


def sampler_order(length: int, seed: int, epoch: int) -> list[int]:
    """The torchvision loader's order for an epoch (one rank): its sampler's."""
    sampler = EpochSeededSampler(range(length), num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return [index for index, _ in sampler]


def _in_workers(pool: ThreadPoolExecutor, order: list, batch: int, threads: int, read: Callable) -> int:
    """``read`` on each item, batch ``k`` in thread ``k % threads`` as DataLoader hands batches to its workers."""
    batches = [order[i : i + batch] for i in range(0, len(order) // batch * batch, batch)]

    def work(worker: int) -> int:
        return sum(read(item) for part in batches[worker::threads] for item in part)

    return sum(pool.map(work, range(threads)))


def python_files(split: Split | ShardSplit, *, threads: int, batch: int, seed: int) -> Reader:
    """Every file's bytes, opened and read whole in the torchvision loader's order: its read path, no decoding."""
    pool = ThreadPoolExecutor(threads)

    def read(path: str) -> int:
        with open(path, "rb") as f:
            return bool(f.read())  # one image read

    def epoch(n: int) -> int:
        order = [split.paths[i] for i in sampler_order(len(split), seed, n)]
        return _in_workers(pool, order, batch, threads, read)

    return Reader(*_source(split), "read only: Python open + read, loader's order", epoch, pool.shutdown)


def python_shards(split: Split | ShardSplit, *, threads: int, batch: int, seed: int) -> Reader:
    """Every sample's image and class members, ``pread`` from tars each thread opens once and keeps open, in the
    torchvision loader's order: data/shard_reader.py's read path, no decoding."""
    samples = [(str(split.root / shard.tar), sample) for shard, sample in split.samples()]
    pool, local, opened = ThreadPoolExecutor(threads), threading.local(), []

    def read(index: int) -> int:
        tar, sample = samples[index]
        if not hasattr(local, "descriptors"):
            local.descriptors = {}
            opened.append(local.descriptors)
        if tar not in local.descriptors:
            local.descriptors[tar] = os.open(tar, os.O_RDONLY | os.O_CLOEXEC)
        read_member(local.descriptors[tar], tar, sample.label_name, sample.label)
        return bool(read_member(local.descriptors[tar], tar, sample.image_name, sample.image))  # one image read

    def epoch(n: int) -> int:
        return _in_workers(pool, sampler_order(len(split), seed, n), batch, threads, read)

    def close() -> None:
        pool.shutdown()
        for descriptors in opened:
            for descriptor in descriptors.values():
                os.close(descriptor)

    return Reader(*_source(split), "read only: Python pread, loader's order", epoch, close)


def dali_read_only(split: Split | ShardSplit, *, threads: int, batch: int, seed: int) -> Reader:
    """The DALI loader's reader alone (``readers.file`` or ``readers.webdataset`` with its shuffle buffer, as
    data/dali.py configures them for training), its encoded bytes and labels as the batches: no decoding."""

    @pipeline_def(enable_conditionals=False)
    def read_only():
        jpegs, labels = dali_train_reader(
            split, Shard(), training=True, reader_seed=seed, shuffle_buffer=DaliLoaders().shuffle_buffer
        )
        return jpegs, labels

    pipe = read_only(batch_size=batch, num_threads=threads, device_id=None, seed=seed + 1, prefetch_queue_depth=2)
    pipe.build()

    def epoch(n: int) -> int:
        return sum(len(pipe.run()[0]) for _ in range(len(split) // batch))

    reader = "readers.file" if isinstance(split, Split) else "readers.webdataset"
    return Reader(*_source(split), f"read only: DALI {reader}", epoch)


def dali_loader(split: Split | ShardSplit, *, threads: int, batch: int, seed: int) -> Reader:
    """The project's DALI train loader on the CPU: decoding random-resized crops to 224 px, flips, normalising."""
    request = BatchRequest(split, ImageSpec(image_size=224), batch, Shard(), Placement(workers=threads))
    loader = DaliLoaders(device="cpu").train(request, seed=seed)

    def epoch(n: int) -> int:
        return sum(len(labels) for _, labels in loader)

    return Reader(*_source(split), "decode: DALI CPU loader", epoch)


def torchvision_loader(split: Split | ShardSplit, *, threads: int, batch: int, seed: int) -> Reader:
    """The project's torchvision train loader (DataLoader workers), normalising its uint8 batches as the
    datamodule does on the device."""
    spec = ImageSpec(image_size=224)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    request = BatchRequest(split, spec, batch, Shard(), Placement(workers=threads))
    loader = TorchvisionLoaders(pin_memory=False).train(request, seed=seed, trained_batches=lambda: 0)

    def epoch(n: int) -> int:
        loader.sampler.set_epoch(n)  # as Lightning does: a new order each epoch
        count = 0
        for images, labels in loader:
            (images.float() - mean) / std  # the datamodule's normalisation (on the device in training)
            count += len(labels)
        return count

    return Reader(*_source(split), "decode: torchvision loader", epoch)


READERS = {  # --readers name: each source's reader
    "python": {"folders": python_files, "shards": python_shards},
    "dali-reader": {"folders": dali_read_only, "shards": dali_read_only},
    "dali": {"folders": dali_loader, "shards": dali_loader},
    "torchvision": {"folders": torchvision_loader, "shards": torchvision_loader},
}
SOURCES = ("folders", "shards")


@dataclass
class Measurement:
    """One reader of one source: per cache state, each timed epoch's images/s, files opened (by kind) and the share
    of the source's bytes in the page cache as the epoch started."""

    source: str
    reader: str
    images: int
    first_epoch_opens: dict[str, int]
    rates: dict[str, list[float]] = field(default_factory=lambda: {"warm": [], "cold": []})
    opens: dict[str, list[dict[str, int]]] = field(default_factory=lambda: {"warm": [], "cold": []})
    cached: dict[str, list[float]] = field(default_factory=lambda: {"warm": [], "cold": []})


def measure(reader: Reader, counter: OpenCounter, epochs: int, build_opens: Counter[str]) -> Measurement:
    """The reader's untimed first epoch, then ``epochs`` pairs of a warm and a cold one. Each epoch's opens are
    counted from the settled end of the one before to its own (what a pipeline prefetched for it then is its), less
    this benchmark's own (eviction and the residency check open each file once); eviction waits for that settling,
    so the prefetch of a cold epoch's first batches (done before, warm) is the only part of it not read cold."""
    mark = counter.settled()
    images = reader.epoch(0)
    now = counter.settled()
    result = Measurement(reader.source, reader.name, images, dict(build_opens + (now - mark)))
    mark = now
    for n in range(1, 2 * epochs + 1):
        cache = "warm" if n % 2 else "cold"
        own = evict(reader.files) if cache == "cold" else Counter()
        share, checked = resident_share(reader.files)
        start = time.perf_counter()
        count = reader.epoch(n)
        seconds = time.perf_counter() - start
        now = counter.settled()
        if count != images:
            raise RuntimeError(f"{reader.source}, {reader.name}: epoch {n} read {count} images, the first {images}")
        result.rates[cache].append(count / seconds)
        result.opens[cache].append(dict(now - mark - own - checked))
        result.cached[cache].append(share)
        mark = now
    return result


def cold_read_rate(path: str) -> float:
    """MB/s of reading one file whole in 1 MiB reads after evicting it: what the disk gives a sequential reader."""
    evict([path])
    start, size = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
    return size / (time.perf_counter() - start) / 1e6


def disk(path: Path) -> dict:
    """The file system under ``path``: type, device, whether the kernel calls it rotational."""
    fstype, source = subprocess.run(
        ["df", "--output=fstype,source", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[-2:]
    rotational = Path("/sys/class/block", Path(source).name, "queue", "rotational")
    return {
        "filesystem": fstype,
        "device": source,
        "rotational": rotational.read_text().strip() == "1" if rotational.exists() else None,
    }


def _opens_text(epochs: list[dict[str, int]]) -> str:
    totals = sorted(sum(e.get(k, 0) for k in FILE_KINDS) for e in epochs)
    spread = f"{totals[0]:,}" if totals[0] == totals[-1] else f"{totals[0]:,}-{totals[-1]:,}"
    kinds = sorted({k for e in epochs for k, v in e.items() if v and k in FILE_KINDS})
    return f"{spread} ({', '.join(kinds)})" if kinds else spread


def table(results: list[Measurement], shards: int | None) -> str:
    """The results as a Markdown table: one row per source, reader and cache state."""
    lines = [
        "| source | reader | cache | img/s (median; each epoch) | files opened per epoch | "
        "opened by build + first epoch | cached at epoch start | shards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        for cache in ("warm", "cold"):
            rates = m.rates[cache]
            each = " / ".join(f"{r:.0f}" for r in rates)
            first = files_opened(Counter(m.first_epoch_opens))
            cached = f"{min(m.cached[cache]):.0%}-{max(m.cached[cache]):.0%}"
            lines.append(
                f"| {m.source} | {m.reader} | {cache} | {statistics.median(rates):.0f} ({each}) | "
                f"{_opens_text(m.opens[cache])} | {first:,} | {cached} | "
                f"{shards if m.source == 'shards' else '-'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/shard_io"), help="where the data sets are built")
    parser.add_argument("--samples", type=Path, default=SAMPLES, help="a flat folder of <wnid>_*.JPEG files")
    parser.add_argument("--copies", type=int, default=20, help="copies of each sample in train/")
    parser.add_argument("--shard-samples", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2, help="pairs of a warm and a cold timed epoch per reader")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: usable cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES))
    parser.add_argument("--readers", nargs="+", choices=list(READERS), default=list(READERS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--clean", action="store_true", help="delete WORKDIR's data sets afterwards")
    args = parser.parse_args(argv)

    samples = sorted(p for p in args.samples.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not samples:
        parser.error(f"--samples {args.samples}: no .JPEG/.jpg files there")
    folders = copy_layout(samples, args.workdir / "folders", args.copies)
    splits = {"folders": load_layout(folders).train}
    if "shards" in args.sources:
        shard_root = convert(folders, args.workdir / "shards", args.shard_samples, args.threads)
        splits["shards"] = ShardSet.open(shard_root).train
    tars = len(splits["shards"].shards) if "shards" in splits else None
    report = {
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.shard_io", *(argv or sys.argv[1:])]),
        "commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": {**machine(), "memory_gib": os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, **disk(args.workdir)},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "dataset": {
            "images": len(splits["folders"]),
            "folder_bytes": sum(os.path.getsize(p) for p in splits["folders"].paths),
            "shards": tars,
        },
        "load_average_at_start": os.getloadavg(),
    }
    if tars:
        report["machine"]["cold_sequential_read_mb_s"] = cold_read_rate(splits["shards"].tar_paths[0])
    results = []
    with OpenCounter([args.workdir / source for source in splits]) as counter:
        for name in args.readers:
            for source in args.sources:
                mark = counter.settled()
                reader = READERS[name][source](splits[source], threads=args.threads, batch=args.batch, seed=args.seed)
                results.append(measure(reader, counter, args.epochs, counter.snapshot() - mark))
                reader.close()
                del reader
                gc.collect()
                print("\n".join(table(results[-1:], tars).splitlines()[-2:]), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    report["results"] = [asdict(m) for m in results]
    text = table(results, tars)
    m = report["machine"]
    print(
        f"\n{report['dataset']['images']:,} train images ({report['dataset']['folder_bytes'] / 1e9:.2f} GB) as "
        f"files and as {tars} shards; {args.threads} threads/workers on {m['cpu_cores_usable']} usable cores "
        f"({m['cpu']}), {m['memory_gib']:.0f} GiB; {m['filesystem']} on {m['device']} (rotational: "
        f"{m['rotational']}); batch {args.batch}; {args.epochs} warm and {args.epochs} cold epochs per reader "
        f"after an untimed one; commit {report['commit']}; load average {report['load_average_at_start'][0]:.1f} "
        f"at start, {report['load_average_at_end'][0]:.1f} at end\n{text}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.clean:
        shutil.rmtree(args.workdir / "folders", ignore_errors=True)
        shutil.rmtree(args.workdir / "shards", ignore_errors=True)
        shutil.rmtree(args.workdir / "index-cache", ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
