"""An ImageNet-like set of JPEG files for benchmarks, in the ILSVRC layout: real ILSVRC samples, or rendered ones.

    python -m benchmarks.jpeg_set OUT [--from FOLDER] [--copies 8] [--per-class 2] [--short-side 375]

With ``--from``, a flat folder of ``<wnid>_<name>.JPEG`` files (such as ../shared/data/imagenet-samples, one per
ILSVRC class) is linked into OUT/train/<wnid>/ ``--copies`` times and once into OUT/val/<wnid>/, so that an epoch
lasts long enough to time. Without it, ``--per-class`` images for each of the 1000 ILSVRC classes are rendered at
ImageNet's typical size (data/demo.py's shapes and textures, shorter side ``--short-side``, JPEG quality 90) on
all cores, then linked likewise. Symbolic links: the page cache holds each file once, as it would a hot dataset.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data.demo import SHAPES, render
from data.ilsvrc import wordnet_names


def _render(task: tuple[Path, int, int, int]) -> None:
    path, label, short_side, seed = task
    render(label % len(SHAPES), np.random.default_rng(seed), short_side).save(path, quality=90)


def rendered_files(folder: Path, per_class: int, short_side: int) -> list[Path]:
    """``per_class`` rendered JPEGs per ILSVRC class in ``folder`` (kept: a second call renders nothing)."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks = [
        (folder / f"{wnid}_{i}.JPEG", label, short_side, label * per_class + i)
        for label, wnid in enumerate(sorted(wordnet_names()))
        for i in range(per_class)
    ]
    todo = [task for task in tasks if not task[0].exists()]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_render, todo, chunksize=16))
    return [task[0] for task in tasks]


def link_layout(files: list[Path], out: Path, copies: int) -> Path:
    """OUT/train/<wnid>/ with ``copies`` links per file, OUT/val/<wnid>/ with one: a root ``data.root`` reads."""
    if not files:
        raise ValueError("no JPEG files to link")
    wnids = wordnet_names()
    for split, count in (("train", copies), ("val", 1)):
        for file in files:
            wnid = file.name.split("_", 1)[0]
            if wnid not in wnids:
                raise ValueError(f"{file}: the name does not start with an ILSVRC wnid (n01440764_...)")
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for copy in range(count):
                link = folder / f"{file.stem}_{copy}{file.suffix}"
                if not link.exists():
                    link.symlink_to(file.resolve())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--from", dest="source", type=Path, help="a flat folder of <wnid>_*.JPEG files")
    parser.add_argument("--copies", type=int, default=8, help="links per file in train/")
    parser.add_argument("--per-class", type=int, default=2, help="rendered images per class (without --from)")
    parser.add_argument("--short-side", type=int, default=375, help="of the rendered images")
    args = parser.parse_args()
    if args.source is not None:
        if not args.source.is_dir():
            parser.error(f"--from {args.source}: not a folder")
        files = sorted(p for p in args.source.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
        if not files:
            parser.error(f"--from {args.source}: no .JPEG/.jpg files there")
    else:
        files = rendered_files(args.out / "rendered", args.per_class, args.short_side)
    try:
        root = link_layout(files, args.out / "root", args.copies)
    except ValueError as error:
        parser.error(str(error))
    print(f"{root}: {len(files) * args.copies} train and {len(files)} val images in 1000 class folders")


if __name__ == "__main__":
    main()
