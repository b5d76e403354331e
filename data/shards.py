"""Convert an ILSVRC-2012 folder layout into a shard set (data/shard_set.py's format), or verify one.

    python -m data.shards /datasets/ILSVRC2012 /datasets/ILSVRC2012-shards [--shard-samples 1024] [--seed 0]
        [--splits train,val] [--index fast|full] [--workers 16] [--cache-dir DIR]
        [--classes imagenette|FILE|WNID|NAME|WNID,WNID,... [--sample-classes N] [--classes-seed 0]]
    python -m data.shards --verify /datasets/ILSVRC2012-shards

Files the index (data/index.py) finds broken never enter a shard; the manifest lists them with their reasons. Each
image keeps its original bytes (no re-encoding). A shard holds ``--shard-samples`` samples, counted rather than
sized, and the samples are spread so that every shard of a split holds the same count give or take one: DALI splits
a split's samples between ranks, so equal shards give every rank the same number of files to open and read. The
train set lies in one seeded permutation over its shards (no shard holds one class), val in ILSVRC id order.

``--classes`` converts a class subset (data/wordnet.py, as ``data.classes`` selects it): a set of those classes only,
indexed in their sorted order, which training with the same ``data.classes`` reads.

The conversion is resumable: its plan (every file's shard, key and label) is written first to OUT/plan.json; a rerun
with the same arguments and the same source writes only the shards not yet finished (a shard is finished when its
index and its tar have their names: the tar takes its name last) and never rewrites a finished one; a rerun whose plan
differs stops and names the difference, and leaves OUT as it is.
The manifest is written last, after every shard's SHA-256 and a check of every sample in it: a set with a manifest
is complete. Tars are deterministic (USTAR, no times or owners), so a conversion repeated elsewhere is byte-identical.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data.ilsvrc import DatasetLayoutError, ILSVRCLayout, Split, load_layout
from data.index import checked_layout, default_cache_dir, file_stats, usable_cores
from data.shard_set import (
    FORMAT,
    INDEX_VERSION,
    LABEL_EXTENSION,
    MANIFEST,
    SPLITS,
    TAR_HEADER,
    VERSION,
    Shard,
    ShardSet,
    ShardSetError,
    file_sha256,
    label_text,
)
from data.spec import ConfigError
from data.wordnet import select_classes

log = logging.getLogger(__name__)

PLAN = "plan.json"
INDEX_MODES = ("fast", "full")
MAX_MEMBER_NAME = 99  # USTAR's name field holds 100 bytes; a longer name would be split into its prefix field
MAGIC = {b"\xff\xd8": "jpg", b"\x89PNG\r\n\x1a\n": "png"}
UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ConversionError(ValueError):
    """A conversion that cannot go on as asked: the message names the file or argument at fault and what to do."""


def sanitise(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``: webdataset splits a member name at
    its first dot, and DALI's index file at spaces."""
    return UNSAFE.sub("_", text)


def sample_key(relative: str, split: str) -> str:
    """A file's key: ``<wnid>/<stem>`` in train, the stem (the ILSVRC id) in val."""
    path = Path(relative)
    return f"{sanitise(path.parent.name)}/{sanitise(path.stem)}" if split == "train" else sanitise(path.stem)


def image_extension(data: bytes, path: str) -> str:
    """``jpg`` or ``png``, from the content's magic bytes (a PNG named .JPEG is a PNG to every decoder)."""
    for magic, extension in MAGIC.items():
        if data.startswith(magic):
            return extension
    raise ConversionError(f"{path}: neither a JPEG nor a PNG (it passed the index: did it change since?)")


def _partial(path: Path) -> Path:
    """Where ``path`` is written before it takes its name: a hidden name in the same folder (``os.replace`` is atomic
    within one file system)."""
    return path.with_name(f".{path.name}.partial")


def _is_partial(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".partial")


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    staging = _partial(path)
    with open(staging, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staging, path)
    _fsync_folder(path.parent)


def _json_bytes(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode()


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}"


def make_plan(
    layout: ILSVRCLayout, excluded: dict[str, str], *, source: dict, splits: list[str], shard_samples: int, seed: int
) -> dict:
    """Which file goes into which shard under which key and label (with its size, so that a changed file is
    noticed): ``[relative path, label, key, size]`` per sample, a list of them per shard. ``layout`` holds every file
    found, ``excluded`` the index's verdicts on those it keeps out."""
    start = len(os.path.join(layout.root, ""))
    kept = [p for split in splits for p in getattr(layout, split).paths if p not in excluded]
    sizes = {p: stat.st_size for p, stat in file_stats(kept).items()}
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "label_digits": max(1, len(str(layout.num_classes - 1))),
        "classes": {"wnids": layout.wnids, "names": layout.names},
        "splits": {},
    }
    for split in splits:
        found: Split = getattr(layout, split)
        entries, owners = [], {}
        for path, label in zip(found.paths, found.labels):
            if path in excluded:
                continue
            relative = path[start:]
            key = sample_key(relative, split)
            if key in owners:
                raise ConversionError(
                    f"{layout.root / owners[key]} and {path} both become sample {key!r} (keys keep only "
                    "[A-Za-z0-9_-], the rest becomes '_'): rename one of them"
                )
            if len(f"{key}.{LABEL_EXTENSION}") > MAX_MEMBER_NAME:  # jpg and png are as long
                raise ConversionError(
                    f"{path}: its sample key {key!r} is {len(key)} characters, too long for a tar member name "
                    f"(USTAR: {MAX_MEMBER_NAME} bytes with its extension): rename it"
                )
            owners[key] = relative
            entries.append([relative, label, key, sizes[path]])
        if split == "train":
            order = np.random.default_rng(seed).permutation(len(entries))
        else:
            order = np.array(sorted(range(len(entries)), key=lambda i: entries[i][2]), dtype=np.int64)
        parts = np.array_split(order, math.ceil(len(entries) / shard_samples)) if entries else []
        plan["splits"][split] = {
            "files": len(found),
            "excluded": [
                {"path": p[start:], "reason": excluded[p]} for p in sorted(set(found.paths) & excluded.keys())
            ],
            "shards": [[entries[i] for i in part] for part in parts],
        }
    return plan


def _source_differences(old: dict, new: dict) -> list[str]:
    return [f"{key} {value!r} (OUT's plan: {old.get(key)!r})" for key, value in new.items() if old.get(key) != value]


def _file_differences(split: str, old_shards: list, new_shards: list) -> list[str]:
    old = {entry[0]: entry for shard in old_shards for entry in shard}
    new = {entry[0]: entry for shard in new_shards for entry in shard}
    groups = {
        "added or no longer excluded": sorted(new.keys() - old.keys()),
        "removed or now excluded": sorted(old.keys() - new.keys()),
        "changed (size, label or key)": sorted(p for p in new.keys() & old.keys() if new[p] != old[p]),
    }
    differences = [f"{split}: {len(paths)} files {what}, e.g. {paths[0]}" for what, paths in groups.items() if paths]
    if not differences and old_shards != new_shards:
        differences.append(f"{split}: the same files in other shards")
    return differences


def plan_differences(old: dict, new: dict) -> list[str]:
    """What differs between OUT's plan and this run's, in words (empty when they are the same)."""
    if old == new:
        return []
    differences = _source_differences(old.get("source", {}), new["source"])
    differences += [
        f"{key} differs" for key in ("format", "version", "label_digits", "classes") if old.get(key) != new[key]
    ]
    for split, record in new["splits"].items():
        old_shards = old.get("splits", {}).get(split, {}).get("shards", [])
        differences += _file_differences(split, old_shards, record["shards"])
    return differences or ["the excluded files' reasons"]


def _refusal(out: Path, differences: list[str]) -> ConversionError:
    return ConversionError(
        f"{out} holds a conversion with another plan ({out / PLAN}): " + "; ".join(differences) + f". Its shards "
        f"are left as they are: choose a new OUT (or delete {out} yourself to convert into it from scratch)"
    )


def existing_plan(out: Path) -> dict | None:
    """OUT's plan, or None where OUT is new or empty; a folder that holds other things is refused (the converter
    writes nowhere it did not plan)."""
    if not out.exists():
        return None
    plan_path = out / PLAN
    if not plan_path.is_file():
        others = sorted(p.name for p in out.iterdir() if not _is_partial(p))
        if others:
            raise ConversionError(
                f"{out} is not empty ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) and holds no "
                f"{PLAN}: it is not a conversion to continue: choose a new or empty OUT"
            )
        return None
    try:
        plan = json.loads(plan_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{plan_path}: cannot be read ({error}): choose a new OUT") from error
    if not isinstance(plan, dict):
        raise ConversionError(f"{plan_path}: not a plan of this converter: choose a new OUT")
    return plan


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """OUT to this process alone: a second converter would take the first one's temporary files for leftovers."""
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConversionError(
                f"{out}: another conversion is writing into it (it holds the folder's lock)"
            ) from None
        except OSError as error:  # a file system without flock
            log.warning("Converting into %s without a lock (%s): run one conversion into it at a time", out, error)
        yield
    finally:
        os.close(fd)


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    """A member's header without anything of the machine or the moment: the same bytes on every rerun."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _read_source(path: str, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ConversionError(f"{path}: cannot be read ({error})") from error
    if len(data) != size:
        raise ConversionError(
            f"{path}: {len(data)} bytes, {size} when the conversion was planned: the source changed since; "
            "convert into a new OUT"
        )
    return data


def write_shard(root: str, folder: Path, name: str, entries: list[list], label_digits: int) -> None:
    """Write one shard's tar and DALI index (each member's offset taken as it is written) under temporary names, then
    give the index and last the tar their names: a tar under its name is a finished shard."""
    tar_path, index_path = folder / f"{name}.tar", folder / f"{name}.idx"
    lines = []
    with open(_partial(tar_path), "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for relative, label, key, size in entries:
                path = os.path.join(root, relative)
                data = _read_source(path, size)
                fields = []
                members = ((image_extension(data, path), data), (LABEL_EXTENSION, label_text(label, label_digits)))
                for extension, payload in members:
                    member = f"{key}.{extension}"
                    fields += [extension, str(f.tell() + TAR_HEADER), str(len(payload)), member]
                    tar.addfile(_member_info(member, len(payload)), io.BytesIO(payload))
                lines.append(" ".join(fields) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _write_atomically(index_path, f"{INDEX_VERSION} {len(lines)}\n{''.join(lines)}".encode())
    os.replace(_partial(tar_path), tar_path)
    _fsync_folder(folder)


def seal_shard(out: Path, split: str, name: str, entries: list[list], label_digits: int, num_classes: int) -> dict:
    """A finished shard's manifest record (sizes, SHA-256 of tar and index), after ``Shard.labelled_keys``'s checks
    (every member where its index places it, a class for every sample) and a comparison with the plan (its keys and
    labels, in order)."""
    tar, index = f"{split}/{name}.tar", f"{split}/{name}.idx"
    record = Shard(
        tar=tar,
        index=index,
        samples=len(entries),
        bytes=(out / tar).stat().st_size,
        index_bytes=(out / index).stat().st_size,
        sha256=file_sha256(out / tar),
        index_sha256=file_sha256(out / index),
    )
    where = str(out / tar)
    planned = [(key, label) for _, label, key, _ in entries]
    try:
        found = record.labelled_keys(out, label_digits, num_classes)
        if found != planned:
            wrong = next(i for i, pair in enumerate(zip(found + [None], planned + [None])) if pair[0] != pair[1])
            raise ShardSetError(
                f"{where}: sample {wrong} is {found[wrong] if wrong < len(found) else 'missing'}, the plan "
                f"({out / PLAN}) has {planned[wrong] if wrong < len(planned) else 'no more'}"
            )
        record.check_index(out)
    except ShardSetError as error:
        raise ConversionError(f"{error}. Delete {out / tar} and run again: the shard will be rewritten") from None
    return asdict(record)


def _verify_shard(root: Path, shard: Shard, label_digits: int, num_classes: int) -> str | None:
    try:
        shard.verify(root, label_digits, num_classes)
    except ShardSetError as error:
        return str(error)
    return None


def in_parallel(
    function: Callable, tasks: list[tuple], *, weights: list[int], workers: int, desc: str, unit: str = "img"
) -> list:
    """``function(*task)`` for every task in worker processes, results in task order, a progress bar counting each
    task's weight; the first failure cancels the tasks not yet started and is raised."""
    results = [None] * len(tasks)
    if not tasks:
        return results
    with (
        ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("fork")) as pool,
        tqdm(
            total=sum(weights),
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            mininterval=0.1 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s
        ) as progress,
    ):
        futures = {pool.submit(function, *task): i for i, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress.update(weights[futures[future]])
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return results


def _empty_split(num_classes: int) -> dict:
    return {"samples": 0, "per_class": [0] * num_classes, "shards": [], "excluded": []}


def convert(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    splits: Sequence[str] = SPLITS,
    index: str = "fast",
    shard_samples: int = 1024,
    seed: int = 0,
    workers: int = 1,
    cache_dir: str | os.PathLike,
    classes: Sequence[str] | None = None,
) -> dict:
    """Convert (or finish converting) ``root`` into the shard set ``out``; its manifest. A split left out of
    ``splits`` is recorded empty (0 samples, no shards), and ``source.splits`` names the splits converted;
    ``classes``: only these (wnids), recorded as ``source.classes``."""
    start = time.monotonic()
    root, out = Path(os.path.abspath(os.path.expanduser(root))), Path(os.path.abspath(os.path.expanduser(out)))
    splits = [split for split in SPLITS if split in splits]
    source = {"root": str(root), "index": index, "seed": seed, "shard_samples": shard_samples, "splits": splits}
    if classes is not None:
        source["classes"] = sorted(classes)
    old = existing_plan(out)
    if old is not None and (differences := _source_differences(old.get("source", {}), source)):
        raise _refusal(out, differences)  # before the scan: a different argument needs no look at the dataset
    layout = load_layout(root)
    if classes is not None:
        layout = layout.subset(classes)
    layout = replace(layout, **{split: Split([], []) for split in SPLITS if split not in splits})
    _, excluded = checked_layout(layout, index, cache_dir, workers)
    plan = make_plan(layout, excluded, source=source, splits=splits, shard_samples=shard_samples, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        old = existing_plan(out)
        if old is None:
            _write_atomically(out / PLAN, _json_bytes(plan))
        elif differences := plan_differences(old, plan):
            raise _refusal(out, differences)
        elif (out / MANIFEST).is_file() and not _unfinished(out, _planned_shards(plan)):
            log.info("%s is complete (its manifest is written, with this plan): nothing to do", out)
            return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        leftovers = [p for folder in (out, *(out / s for s in splits)) for p in folder.glob(".*.partial")]
        for path in leftovers:
            path.unlink()
        if leftovers:
            log.info("Removed %d temporary files of an interrupted conversion", len(leftovers))
        manifest = _write_and_seal(root, out, plan, workers)
    _log_summary(out, manifest, time.monotonic() - start)
    return manifest


def _planned_shards(plan: dict) -> list[tuple[str, str, list[list]]]:
    """(split, shard name, entries) of every shard the plan names."""
    return [
        (split, shard_name(split, number), entries)
        for split, record in plan["splits"].items()
        for number, entries in enumerate(record["shards"])
    ]


def _unfinished(out: Path, shards: list[tuple[str, str, list[list]]]) -> list[tuple[str, str, list[list]]]:
    return [s for s in shards if not all((out / s[0] / f"{s[1]}.{ext}").is_file() for ext in ("idx", "tar"))]


def _write_and_seal(root: Path, out: Path, plan: dict, workers: int) -> dict:
    """The shards not yet finished, then every shard's record, then the manifest."""
    digits, num_classes = plan["label_digits"], len(plan["classes"]["wnids"])
    shards = _planned_shards(plan)
    for split in plan["splits"]:
        (out / split).mkdir(exist_ok=True)
    todo = _unfinished(out, shards)
    if len(todo) < len(shards):
        log.info(
            "Continuing %s: %d of %d shards are finished, %d to write",
            out,
            len(shards) - len(todo),
            len(shards),
            len(todo),
        )
    in_parallel(
        write_shard,
        [(str(root), out / split, name, entries, digits) for split, name, entries in todo],
        weights=[len(entries) for _, _, entries in todo],
        workers=workers,
        desc="Writing shards",
    )
    records = in_parallel(
        seal_shard,
        [(out, split, name, entries, digits, num_classes) for split, name, entries in shards],
        weights=[len(entries) for _, _, entries in shards],
        workers=workers,
        desc="Hashing and checking shards",
    )
    manifest_splits = {split: _empty_split(num_classes) for split in SPLITS}
    for (split, _, entries), record in zip(shards, records):
        manifest_splits[split]["shards"].append(record)
        manifest_splits[split]["samples"] += len(entries)
        for _, label, _, _ in entries:
            manifest_splits[split]["per_class"][label] += 1
    for split, record in plan["splits"].items():
        manifest_splits[split]["excluded"] = record["excluded"]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "label_digits": digits,
        "classes": plan["classes"],
        "splits": manifest_splits,
        "source": {
            **plan["source"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": {split: record["files"] for split, record in plan["splits"].items()},
        },
    }
    _write_atomically(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _log_summary(out: Path, manifest: dict, seconds: float) -> None:
    for split, record in manifest["splits"].items():
        if split in manifest["source"]["splits"]:
            log.info(
                "%s: %d shards, %s samples, %s, %d files excluded",
                split,
                len(record["shards"]),
                f"{record['samples']:,}",
                tqdm.format_sizeof(sum(shard["bytes"] for shard in record["shards"]), "B"),
                len(record["excluded"]),
            )
    excluded = sum(len(record["excluded"]) for record in manifest["splits"].values())
    log.info(
        "Converted %s into %s in %.1f s%s",
        manifest["source"]["root"],
        out,
        seconds,
        f"; the {excluded} excluded files and their reasons are in {out / MANIFEST}" if excluded else "",
    )


def verify(shard_set: ShardSet, workers: int) -> list[str]:
    """Every shard of the set checked as ``ShardSet.verify`` does (checksums, every index line against its tar,
    every class), in parallel and to the end: one message per faulty shard (none when all is well)."""
    shards = [*shard_set.train.shards, *shard_set.val.shards]
    failures = in_parallel(
        _verify_shard,
        [(shard_set.root, shard, shard_set.label_digits, shard_set.num_classes) for shard in shards],
        weights=[shard.bytes + shard.index_bytes for shard in shards],
        workers=workers,
        desc="Verifying shards",
        unit="B",
    )
    return [failure for failure in failures if failure is not None]


def _split_names(text: str) -> list[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(SPLITS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected splits among {','.join(SPLITS)}, got {text!r}")
    return [split for split in SPLITS if split in names]


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _seed(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, nargs="?", metavar="ROOT", help="the ILSVRC-2012 folder (train/, val/)")
    parser.add_argument(
        "out", type=Path, nargs="?", metavar="OUT", help="the shard set's folder: new, empty, or to go on"
    )
    parser.add_argument("--verify", type=Path, metavar="OUT", help="verify the shard set OUT instead of converting")
    parser.add_argument(
        "--shard-samples", type=_positive, default=1024, metavar="N", help="samples per shard (1024: ~110 MB of train)"
    )
    parser.add_argument("--seed", type=_seed, default=0, metavar="N", help="the train permutation's seed (0)")
    parser.add_argument("--splits", type=_split_names, default=list(SPLITS), help="the splits to convert (train,val)")
    parser.add_argument("--index", choices=INDEX_MODES, default="fast", help="python -m data.index's --mode (fast)")
    parser.add_argument("--workers", type=_positive, default=usable_cores(), metavar="N", help="(the usable cores)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="the index's verdict cache")
    parser.add_argument(
        "--classes",
        metavar="SELECTION",
        help="a class subset as data.classes takes it: a ready list, a file of wnids, a WordNet wnid or name, or "
        "wnids separated by commas",
    )
    parser.add_argument("--sample-classes", type=_positive, metavar="N", help="a seeded draw of N of --classes")
    parser.add_argument("--classes-seed", type=_seed, default=0, metavar="N", help="the draw's seed (0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.verify is not None:
        if args.root is not None:
            parser.error("--verify OUT takes no other path")
        try:
            shard_set = ShardSet.open(args.verify)
        except ShardSetError as error:
            print(f"{parser.prog}: error: {error}", file=sys.stderr)
            return 1
        failures = verify(shard_set, args.workers)
        for failure in failures:
            print(f"{parser.prog}: error: {failure}", file=sys.stderr)
        if failures:
            print(f"{len(failures)} shards of {args.verify} failed verification", file=sys.stderr)
            return 1
        print(f"{shard_set.summary()}: every checksum, index line and class verified")
        return 0
    if args.root is None or args.out is None:
        parser.error("expected ROOT and OUT (or --verify OUT)")
    if not args.root.is_dir():
        parser.error(f"ROOT {args.root} does not exist or is not a folder")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"OUT {args.out} is a file: name a folder (new, empty, or a conversion to continue)")
    if args.sample_classes is not None and args.classes is None:
        parser.error("--sample-classes draws from --classes: give both")
    try:
        selection = args.classes.split(",") if args.classes and "," in args.classes else args.classes
        chosen = select_classes(selection, args.sample_classes, args.classes_seed)
    except ConfigError as error:
        parser.error(str(error).replace("data.classes", "--classes").replace("data.sample_classes", "--sample-classes"))
    if chosen is not None:
        log.info("Classes (--classes): %s", chosen.description)
    try:
        convert(
            args.root,
            args.out,
            splits=args.splits,
            index=args.index,
            shard_samples=args.shard_samples,
            seed=args.seed,
            workers=args.workers,
            cache_dir=args.cache_dir,
            classes=chosen.wnids if chosen else None,
        )
    except (ConversionError, DatasetLayoutError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted: the same command continues the conversion", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
