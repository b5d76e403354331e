"""The prepare/index step: check every image file once, in parallel, and keep the bad ones out of training.

DALI has no skip-bad-sample option (one unreadable file is a fatal pipeline error), so files are checked before
training and only the good ones reach the pipelines. Results are cached per file (size, mtime) in the cache
folder, saved as the scan goes, so a second run, or one resumed after an interruption, checks only what changed.

    python -m data.index /datasets/ILSVRC2012 [--mode fast|full] [--workers 16]

fast: the header parses as a JPEG or PNG, and the file is whole (ends with its end marker, or else decodes).
full: every loader's decoder decodes it (torchvision's and DALI's): such a file never stops a loader.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.ilsvrc import ILSVRCLayout, Split, load_layout
from data.spec import ImageSpec
from data.torchvision_backend import decode

log = logging.getLogger(__name__)

MODES = ("none", "fast", "full")
FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}  # MPO: phones' multi-picture JPEG (a JPEG first)
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
SAVE_EVERY_S = 30.0


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


def index_files(paths: list[str], cache: IndexCache, full: bool, workers: int) -> dict[str, str]:
    """Verdict for every path, checking in parallel only those the cache does not know in their current state."""
    stats = {p: os.stat(p) for p in paths}
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
    if mode not in MODES:
        raise ValueError(f"data.index must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return layout
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
    return replace(layout, train=_keep(layout.train, verdicts), val=_keep(layout.val, verdicts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path)
    parser.add_argument("--mode", choices=MODES[1:], default="fast")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "imagenet-pipeline",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    layout = indexed_layout(load_layout(args.root), args.mode, args.cache_dir, args.workers)
    print(layout.summary())


if __name__ == "__main__":
    main()
