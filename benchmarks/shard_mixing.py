"""How well the train samples of a shard set mix, against the full permutation of an image folder: the class
histogram of batches, how often batches repeat from one epoch to the next, and the classes one rank of eight sees.

    python -m benchmarks.shard_mixing [--classes 1000] [--per-class 100] [--shard-samples 1024] [--batch 256]
        [--epochs 3] [--buffers 0,1024,4096,16384] [--json PATH] [--folder DIR]

A synthetic ILSVRC-shaped train set (``--classes`` x ``--per-class`` samples, listed class by class as the folder
index lists them) is written as files, then twice as a shard set by the converter's own functions (data/shards.py:
``make_plan``, ``write_shard``, ``seal_shard``): in its train order (``np.random.default_rng(seed).permutation``, then
``np.array_split`` into equal shards) and, to show why the converter permutes, the same shards filled in class order.
Every sample is a tiny file whose bytes are a JPEG's two magic bytes and the sample's number: nothing is decoded,
the number identifies the sample in the reader's output.

The orders are those of the real DALI readers, built by ``data.dali.reader`` as the train loader builds them (CPU
pipeline, ``shuffle_after_epoch`` with one reader seed, rank ``r`` of ``W``): ``readers.file`` over the same samples
as files (a full permutation each epoch: the image-folder baseline), and ``readers.webdataset`` over each shard set
(a permutation of whole shards each epoch, each shard read in order) with each shuffle buffer. Each epoch counts the
batches the train loader yields (``DaliLoaders.batches_per_epoch``: full batches, the same count on every rank).

Per order, for world size 1 and for rank 0 of 8:

* the class histogram of each batch against uniform: distinct classes, the chi-square statistic of its class counts
  against ``batch / classes`` each, the largest count of one class (means over batches), with the expectation of
  i.i.d. uniform sampling for reference (distinct ``C (1 - (1 - 1/C)^B)``, chi-square ``C - 1``);
* batches repeating across epochs: of the sample pairs that share a batch in epoch e, the share that share a batch
  again in epoch e + 1 (mean over consecutive epochs; a full permutation: ``T (B - 1) / (N - 1)``, T the share of
  the set a rank trains on per epoch);
* the share of the classes the rank trains on per epoch (mean; a random subset of ``n`` samples of N: 1 minus the
  chance that none of a class's ``k`` samples is drawn).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import nvidia.dali
from nvidia.dali import pipeline_def

from data.dali import DaliLoaders
from data.dali import reader as train_reader
from data.ilsvrc import ILSVRCLayout, Split
from data.placement import Shard
from data.shard_set import FORMAT, MANIFEST, VERSION, ShardSet, ShardSplit
from data.shards import make_plan, seal_shard, shard_name, write_shard

JPEG_MAGIC = b"\xff\xd8"
ID_BYTES = 4  # the sample's number after the magic, little-endian
PIPELINE_SEED = 12345  # DALI's own seed; the reader's order comes from the reader seed (data.dali.reader)


def synthetic_labels(classes: int, per_class: int) -> np.ndarray:
    """The class of each sample, class by class (the order the folder index lists an ILSVRC train set in)."""
    return np.repeat(np.arange(classes, dtype=np.int64), per_class)


def sample_bytes(number: int) -> bytes:
    return JPEG_MAGIC + int(number).to_bytes(ID_BYTES, "little")


def sample_numbers(batch) -> np.ndarray:
    """The sample numbers of a DALI batch of sample bytes."""
    data = np.asarray(batch.as_array())
    return data[:, len(JPEG_MAGIC) :].copy().view("<u4").reshape(-1).astype(np.int64)


def write_files(folder: Path, labels: np.ndarray) -> Split:
    """One file per sample, ``<wnid>/<wnid>_<number>.JPEG``, as a folder ``Split`` (what ``readers.file`` reads and
    the shards are written from)."""
    paths = []
    for number, label in enumerate(labels.tolist()):
        wnid = f"n{label:08d}"
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        path = folder / wnid / f"{wnid}_{number}.JPEG"
        path.write_bytes(sample_bytes(number))
        paths.append(str(path))
    return Split(paths, labels.tolist())


def _number(entry: list) -> int:
    """The sample number of a plan entry ``[relative path, label, key, size]`` (its key ends in ``_<number>``)."""
    return int(entry[2].rsplit("_", 1)[1])


def conversion_plan(folder: Path, files: Split, shard_samples: int, seed: int | None) -> dict:
    """data/shards.py's plan for the train files ``files`` under ``folder`` (``make_plan``: the seeded permutation,
    then ``np.array_split`` into equal shards); with ``seed=None`` the same shards filled in class order instead,
    what a converter without the permutation would write."""
    classes = max(files.labels) + 1
    wnids = [f"n{c:08d}" for c in range(classes)]
    layout = ILSVRCLayout(folder, wnids, wnids, files, Split([], []))
    source = {"synthetic": str(folder), "seed": seed, "shard_samples": shard_samples, "splits": ["train"]}
    plan = make_plan(layout, {}, source=source, splits=["train"], shard_samples=shard_samples, seed=seed or 0)
    if seed is None:
        shards = plan["splits"]["train"]["shards"]
        entries = sorted((entry for shard in shards for entry in shard), key=_number)
        parts = np.array_split(np.arange(len(entries)), len(shards))
        plan["splits"]["train"]["shards"] = [[entries[i] for i in part] for part in parts]
    return plan


def write_shard_set(out: Path, folder: Path, plan: dict) -> ShardSet:
    """The shard set of ``plan``'s train split: each shard written and sealed by data/shards.py (``write_shard``,
    ``seal_shard``), then the manifest; opened with ``ShardSet.open``, whose checks it passes."""
    digits, num_classes = plan["label_digits"], len(plan["classes"]["wnids"])
    (out / "train").mkdir(parents=True)
    record = {"samples": 0, "per_class": [0] * num_classes, "shards": [], "excluded": []}
    for number, entries in enumerate(plan["splits"]["train"]["shards"]):
        name = shard_name("train", number)
        write_shard(str(folder), out / "train", name, entries, digits)
        record["shards"].append(seal_shard(out, "train", name, entries, digits, num_classes))
        record["samples"] += len(entries)
        for _, label, _, _ in entries:
            record["per_class"][label] += 1
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "label_digits": digits,
        "classes": plan["classes"],
        "splits": {
            "train": record,
            "val": {"samples": 0, "per_class": [0] * num_classes, "shards": [], "excluded": []},
        },
        "source": plan["source"],
    }
    (out / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return ShardSet.open(out)


@pipeline_def(enable_conditionals=False)
def reader_pipeline(split: Split | ShardSplit, shard: Shard, reader_seed: int, shuffle_buffer: int):
    """The train loader's reader (``data.dali.reader``) alone: the sample bytes and the parsed labels."""
    samples, labels = train_reader(split, shard, training=True, reader_seed=reader_seed, shuffle_buffer=shuffle_buffer)
    return samples, labels


def read_epochs(
    split: Split | ShardSplit, shard: Shard, batch: int, epochs: int, reader_seed: int, shuffle_buffer: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per epoch, the sample numbers and labels of the batches the train loader yields, in order (the reader's
    epoch is read to its end, as the loader drains it). Checks that each epoch reads the rank's part of the split
    once, each sample once, with the label the sample was written with."""
    n = len(split)
    part = n * (shard.rank + 1) // shard.world_size - n * shard.rank // shard.world_size
    steps = DaliLoaders.batches_per_epoch(n, batch, shard)
    pipe = reader_pipeline(
        split, shard, reader_seed, shuffle_buffer, batch_size=batch, num_threads=2, device_id=None, seed=PIPELINE_SEED
    )
    pipe.build()
    expected_labels = np.asarray(split.labels) if isinstance(split, Split) else None
    out = []
    for _ in range(epochs):
        numbers, labels = [], []
        for _ in range(math.ceil(part / batch)):
            data, label = pipe.run()
            numbers.append(sample_numbers(data))
            labels.append(np.asarray(label.as_array()).reshape(-1))
        numbers, labels = np.concatenate(numbers)[:part], np.concatenate(labels)[:part]  # the padded tail dropped
        if len(np.unique(numbers)) != part:
            raise AssertionError(f"an epoch of {part} samples read {len(np.unique(numbers))} distinct ones")
        if expected_labels is not None and not np.array_equal(expected_labels[numbers], labels):
            raise AssertionError("readers.file gave a sample another label")
        out.append((numbers[: steps * batch], labels[: steps * batch]))
    return out


def batch_histograms(labels: np.ndarray, batch: int, classes: int) -> dict:
    """Means over batches of the distinct classes, the chi-square statistic against uniform, the largest class."""
    rows = labels.reshape(-1, batch)
    counts = np.bincount((np.arange(len(rows))[:, None] * classes + rows).reshape(-1), minlength=len(rows) * classes)
    counts = counts.reshape(len(rows), classes)
    expected = batch / classes
    return {
        "distinct": float((counts > 0).sum(1).mean()),
        "chi2": float(((counts - expected) ** 2 / expected).sum(1).mean()),
        "largest": float(counts.max(1).mean()),
    }


def repeated_pairs(first: np.ndarray, second: np.ndarray, batch: int, samples: int) -> float:
    """Of the sample pairs that share a batch in epoch ``first``, the share that share one again in ``second``."""
    batch_of = np.full(samples, -1, dtype=np.int64)
    batch_of[second] = np.arange(len(second)) // batch
    again = batch_of[first]
    kept = again >= 0
    keys = (np.arange(len(first)) // batch)[kept] * (len(second) // batch + 1) + again[kept]
    _, together = np.unique(keys, return_counts=True)
    pairs = len(first) // batch * batch * (batch - 1) / 2
    return float((together * (together - 1) / 2).sum() / pairs)


def measure_order(epochs: list[tuple[np.ndarray, np.ndarray]], batch: int, classes: int, samples: int) -> dict:
    histograms = [batch_histograms(labels, batch, classes) for _, labels in epochs]
    result = {key: float(np.mean([h[key] for h in histograms])) for key in histograms[0]}
    result["repeated_pairs"] = float(
        np.mean([repeated_pairs(a, b, batch, samples) for (a, _), (b, _) in zip(epochs, epochs[1:])])
    )
    result["classes_seen"] = float(np.mean([len(np.unique(labels)) / classes for _, labels in epochs]))
    return result


def iid_expectation(classes: int, per_class: int, batch: int, world_size: int) -> dict:
    """The figures of i.i.d. uniform batches (histograms) and of a full permutation per epoch (pairs, classes)."""
    samples = classes * per_class
    trained = samples // world_size // batch * batch
    absent = 0.0  # a class's k samples all outside a random subset of `trained` of N: C(N-k, n) / C(N, n)
    if trained + per_class <= samples:
        absent = math.exp(
            math.lgamma(samples - per_class + 1)
            + math.lgamma(samples - trained + 1)
            - math.lgamma(samples - per_class - trained + 1)
            - math.lgamma(samples + 1)
        )
    return {
        "distinct": classes * (1 - (1 - 1 / classes) ** batch),
        "chi2": classes - 1,
        "largest": None,
        "repeated_pairs": trained / samples * (batch - 1) / (samples - 1),
        "classes_seen": 1 - absent,
    }


@dataclass(frozen=True)
class Order:
    name: str
    reader: str  # "files", "shards" (the converter's permutation) or "sorted" (shards sorted by class)
    shuffle_buffer: int = 0


def orders(buffers: Sequence[int], sorted_buffers: Sequence[int]) -> list[Order]:
    return [
        Order("files: readers.file, full permutation", "files"),
        *(Order(f"shards, converter's permutation, buffer {b}", "shards", b) for b in buffers),
        *(Order(f"shards sorted by class, buffer {b}", "sorted", b) for b in sorted_buffers),
    ]


def run(
    folder: Path,
    classes: int,
    per_class: int,
    shard_samples: int,
    batch: int,
    epochs: int,
    buffers: Sequence[int],
    sorted_buffers: Sequence[int],
    world_sizes: Sequence[int] = (1, 8),
    conversion_seed: int = 0,
    reader_seed: int = 0,
) -> dict:
    """Writes the synthetic sets under ``folder`` and measures every order for rank 0 of each world size."""
    start = time.perf_counter()
    labels = synthetic_labels(classes, per_class)
    files = write_files(folder / "files", labels)
    splits: dict[str, Split | ShardSplit] = {"files": files}
    for reader, seed in (("shards", conversion_seed), ("sorted", None)):
        plan = conversion_plan(folder / "files", files, shard_samples, seed)
        splits[reader] = write_shard_set(folder / reader, folder / "files", plan).train
    shards = len(splits["shards"].shards)
    results = {
        "classes": classes,
        "per_class": per_class,
        "samples": len(labels),
        "shard_samples": shard_samples,
        "shards": shards,
        "batch": batch,
        "epochs": epochs,
        "conversion_seed": conversion_seed,
        "reader_seed": reader_seed,
        "dali": nvidia.dali.__version__,
        "write_seconds": time.perf_counter() - start,
        "expected": {str(w): iid_expectation(classes, per_class, batch, w) for w in world_sizes},
        "orders": [],
    }
    for order in orders(buffers, sorted_buffers):
        row = {**asdict(order), "worlds": {}}
        for world_size in world_sizes:
            began = time.perf_counter()
            read = read_epochs(
                splits[order.reader], Shard(0, world_size), batch, epochs, reader_seed, order.shuffle_buffer
            )
            row["worlds"][str(world_size)] = {
                **measure_order(read, batch, classes, len(labels)),
                "seconds": time.perf_counter() - began,
            }
        results["orders"].append(row)
    results["seconds"] = time.perf_counter() - start
    return results


def _figure(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(results: dict) -> str:
    """One table per world size, in Markdown."""
    lines = [
        f"{results['classes']} classes x {results['per_class']} = {results['samples']:,} samples, "
        f"{results['shards']} shards of ~{results['shard_samples']}, batch {results['batch']}, "
        f"{results['epochs']} epochs, DALI {results['dali']}"
    ]
    for world in results["expected"]:
        who = "world size 1" if world == "1" else f"rank 0 of {world}"
        lines += [
            "",
            f"{who}: means over batches (histograms) and epochs",
            "",
            "| order | distinct classes / batch | chi-square / batch | largest class / batch | pairs together again "
            "next epoch | classes seen per epoch |",
            "|---|---|---|---|---|---|",
        ]
        expected = results["expected"][world]
        rows = [("i.i.d. uniform (histograms), random subset (pairs, classes)", expected)]
        rows += [(order["name"], order["worlds"][world]) for order in results["orders"]]
        for name, r in rows:
            lines.append(
                f"| {name} | {_figure(r['distinct'], 1)} | {_figure(r['chi2'], 0)} | {_figure(r['largest'], 2)} "
                f"| {r['repeated_pairs']:.5f} | {r['classes_seen']:.1%} |"
            )
    lines += ["", f"{results['seconds']:.0f} s in all ({results['write_seconds']:.0f} s writing the sets)"]
    return "\n".join(lines)


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--shard-samples", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--buffers", type=_numbers, default=[0, 1024, 4096, 16384], help="shuffle buffers")
    parser.add_argument("--sorted-buffers", type=_numbers, default=[0, 1024, 16384], help="for the sorted shards")
    parser.add_argument("--world-sizes", type=_numbers, default=[1, 8])
    parser.add_argument("--conversion-seed", type=int, default=0)
    parser.add_argument("--reader-seed", type=int, default=0)
    parser.add_argument("--folder", default=None, help="where to write the sets (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    folder = Path(args.folder or tempfile.mkdtemp(prefix="shard-mixing-"))
    try:
        results = run(
            folder,
            args.classes,
            args.per_class,
            args.shard_samples,
            args.batch,
            args.epochs,
            args.buffers,
            args.sorted_buffers,
            args.world_sizes,
            args.conversion_seed,
            args.reader_seed,
        )
    finally:
        if not args.folder:
            shutil.rmtree(folder)
    results["command"] = "python -m benchmarks.shard_mixing " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
