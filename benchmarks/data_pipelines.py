"""Images/s of the train data pipelines on a folder of JPEGs, against the machine's JPEG-decoding ceiling.

    python benchmarks/data_pipelines.py [FOLDER] [--threads N] [--batch 64] [--epochs 3] [--json out.json]

Every pipeline decodes, random-resized-crops to 224, flips and normalises, with N worker processes or threads;
one warm-up epoch is excluded, then the median epoch rate is reported. The ceiling is plain decoding of the
same files, whole (``torchvision.io.decode_jpeg``), in N processes. FOLDER is searched recursively.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import nvidia.dali  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402
from torchvision.io import ImageReadMode, decode_image, read_file  # noqa: E402

from data import dali, torchvision_backend  # noqa: E402
from data.ilsvrc import PIXEL_MEAN, PIXEL_STD, Split  # noqa: E402

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


def _decode(path: str) -> None:
    decode_image(read_file(path), mode=ImageReadMode.RGB)


def _decode_all(paths: list[str]) -> int:
    for path in paths:
        _decode(path)
    return len(paths)


def decode_ceiling(split: Split, threads: int, epochs: int) -> list[float]:
    chunks = [split.paths[i::threads] for i in range(threads)]
    rates = []
    with ProcessPoolExecutor(threads) as pool:
        for _ in range(epochs + 1):
            start = time.perf_counter()
            count = sum(pool.map(_decode_all, chunks))
            rates.append(count / (time.perf_counter() - start))
    return rates[1:]


def epoch_rates(
    loader: Iterable, epochs: int, finish: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
) -> list[float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, nargs="?", default=PROJECT_ROOT.parent / "shared/data/imagenet-samples")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = sorted(str(p) for p in args.folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    if not paths:
        raise SystemExit(f"no JPEG files in {args.folder}")
    split = Split(paths, list(range(len(paths))))
    n, b, e = args.threads, args.batch, args.epochs
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    results = {"decode ceiling (decode_jpeg, no augmentation)": decode_ceiling(split, n, e)}
    results["torchvision classic (ImageFolder + PIL + transforms)"] = epoch_rates(
        DataLoader(ClassicImageFolder(split), batch_size=b, shuffle=True, num_workers=n, persistent_workers=True), e
    )
    results["torchvision fast path (decode_jpeg + transforms.v2 on uint8)"] = epoch_rates(
        torchvision_backend.train_loader(split, b, SIZE, (0.08, 1.0), n, 0, 1, 0, False, lambda: 0),
        e,
        finish=lambda x: (x.float() - mean) / std,
    )
    results["DALI CPU"] = epoch_rates(dali.train_loader(split, b, SIZE, (0.08, 1.0), n, 0, 1, 0, "cpu", 0), e)
    if torch.cuda.is_available():
        results["DALI GPU (mixed)"] = epoch_rates(
            dali.train_loader(split, b, SIZE, (0.08, 1.0), n, 0, 1, 0, "mixed", 0), e
        )
    ceiling = statistics.median(results["decode ceiling (decode_jpeg, no augmentation)"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(
        f"\n{len(paths)} JPEGs from {args.folder}; {n} threads/workers on {os.cpu_count()} CPU cores; {gpu}; "
        f"batch {b}; median of {e} epochs after 1 warm-up; torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, DALI {nvidia.dali.__version__}"
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
