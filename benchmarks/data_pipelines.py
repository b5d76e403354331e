"""Images/s of the train data pipelines on a folder of JPEGs, against the machine's JPEG-decoding ceiling.

    python benchmarks/data_pipelines.py [FOLDER] [--threads N] [--batch 64] [--epochs 2] [--repeats 3] [--json F]

Every pipeline decodes, random-resized-crops to 224, flips and normalises, with N worker processes or threads.
The pipelines take turns (``--repeats``), each turn a warm-up epoch and ``--epochs`` timed ones, so that the
machine's drift falls on all of them; the median epoch rate is reported. The ceiling is plain decoding of the
same files, whole (``torchvision.io.decode_jpeg``), in N processes. FOLDER is searched recursively.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path

import nvidia.dali
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_image, read_file

from data.dali import DaliLoaders
from data.ilsvrc import Split
from data.placement import BatchRequest, Placement, Shard
from data.spec import ImageSpec
from data.torchvision_backend import TorchvisionLoaders, train_transform

PROJECT_ROOT = Path(__file__).resolve().parents[1]

SIZE = 224


class ClassicImageFolder(Dataset):
    """The classic torchvision recipe: PIL decode, then transforms on PIL images, ToTensor and Normalize."""

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(SIZE),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        with Image.open(self.split.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.split.labels[index]


class PlainFiles(Dataset):
    """The plain transforms.v2 recipe on the same decoder: decode_image, the spec's train transform on uint8, nothing
    else (no per-sample seeding, so no exact mid-epoch resume)."""

    def __init__(self, split: Split, spec: ImageSpec) -> None:
        self.split, self.transform = split, train_transform(spec)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        return self.transform(decode_image(read_file(self.split.paths[index]), mode=ImageReadMode.RGB)), index


def _decode_all(paths: list[str]) -> int:
    for path in paths:
        decode_image(read_file(path), mode=ImageReadMode.RGB)
    return len(paths)


def decode_rates(pool: ProcessPoolExecutor, chunks: list[list[str]], epochs: int) -> list[float]:
    """Whole-image decoding, one chunk of the files per process: the ceiling."""
    rates = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        count = sum(pool.map(_decode_all, chunks))
        rates.append(count / (time.perf_counter() - start))
    return rates[1:]


def epoch_rates(
    loader: Iterable, epochs: int, finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
) -> list[float]:
    """Images/s of ``epochs`` epochs after a warm-up one; ``finish`` is what the trainer would still do to a batch."""
    rates = []
    for _ in range(epochs + 1):
        start, count = time.perf_counter(), 0
        for images, labels in loader:
            finish(images)
            count += len(labels)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start))
    return rates[1:]


def pipelines(split: Split, threads: int, batch: int, pool: ProcessPoolExecutor) -> dict[str, Callable[[int], list]]:
    """Name -> a function measuring that many epochs; loaders and worker processes built once and kept."""
    spec = ImageSpec(image_size=SIZE)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    on_cpu = BatchRequest(split, spec, batch, Shard(), Placement(workers=threads))
    measures = {
        "decode ceiling (decode_jpeg, no augmentation)": partial(
            decode_rates, pool, [split.paths[i::threads] for i in range(threads)]
        ),
        "torchvision classic (ImageFolder + PIL + transforms)": partial(
            epoch_rates,
            DataLoader(
                ClassicImageFolder(split), batch_size=batch, shuffle=True, num_workers=threads, persistent_workers=True
            ),
        ),
        "plain decode_jpeg + transforms.v2 on uint8 (no exact resume)": partial(
            epoch_rates,
            DataLoader(
                PlainFiles(split, spec),
                batch_size=batch,
                shuffle=True,
                drop_last=True,
                num_workers=threads,
                persistent_workers=True,
            ),
            finish=lambda x: (x.float() - mean) / std,
        ),
        "torchvision fast path (decode_jpeg + transforms.v2 on uint8)": partial(
            epoch_rates,
            TorchvisionLoaders().train(on_cpu, seed=0, trained_batches=lambda: 0),
            finish=lambda x: (x.float() - mean) / std,
        ),
        "DALI CPU": partial(epoch_rates, DaliLoaders("cpu").train(on_cpu, seed=0)),
    }
    if torch.cuda.is_available():
        on_gpu = replace(
            on_cpu, placement=Placement(torch.device("cuda", torch.cuda.current_device()), workers=threads)
        )
        measures["DALI GPU (mixed)"] = partial(epoch_rates, DaliLoaders("mixed").train(on_gpu, seed=0))
    return measures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=PROJECT_ROOT.parent / "shared/data/imagenet-samples")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per turn, after a warm-up one")
    parser.add_argument("--repeats", type=int, default=3, help="turns; the pipelines take them in turn")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = sorted(str(p) for p in args.folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if not paths:
        raise SystemExit(f"no JPEG files in {args.folder}")
    split = Split(paths, list(range(len(paths))))
    with ProcessPoolExecutor(args.threads) as pool:
        measures = pipelines(split, args.threads, args.batch, pool)
        results = {name: [] for name in measures}
        for _ in range(args.repeats):  # in turn, so the machine's drift falls on every pipeline alike
            for name, measure in measures.items():
                results[name] += measure(args.epochs)
    ceiling = statistics.median(results["decode ceiling (decode_jpeg, no augmentation)"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"\n{len(paths)} JPEGs from {args.folder}; {args.threads} threads/workers on {os.cpu_count()} CPU cores; "
        f"{gpu}; batch {args.batch}; median of {args.repeats} turns x {args.epochs} epochs, each turn after a warm-up "
        f"epoch; torch {torch.__version__}, torchvision {torchvision.__version__}, DALI {nvidia.dali.__version__}"
    )
    print(f"{'pipeline':<64}{'img/s':>8}{'of ceiling':>12}")
    for name, rates in results.items():
        print(f"{name:<64}{statistics.median(rates):8.0f}{statistics.median(rates) / ceiling:12.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({name: {"median": statistics.median(r), "runs": r} for name, r in results.items()}, indent=1)
        )


if __name__ == "__main__":
    main()
