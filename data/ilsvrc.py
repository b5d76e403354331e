"""The ILSVRC-2012 folder layout: class index, readable names, validation ground truth, and its checks.

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG                                   (class folders), or
    <root>/val/*.JPEG + <root>/[val/]LOC_val_solution.csv      (flat, as Kaggle ships it)

Class index = sorted wnid order, as torchvision's ImageFolder and the standard 0..999 ILSVRC index.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
VAL_SOLUTION = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
CLASS_TABLE = Path(__file__).with_name("ilsvrc2012_classes.tsv")
HIERARCHY_TABLE = Path(__file__).with_name("ilsvrc2012_hierarchy.tsv")
UNREADABLE_FILE_ADVICE = (
    "A file that a decoder cannot read stops the run: check the dataset with `python -m data.index <data.root> "
    "--mode full`, which leaves such files out (or train with data.index=full)"
)
FULL_ILSVRC2012 = {"classes": 1000, "train": 1_281_167, "val": 50_000}


class DatasetLayoutError(ValueError):
    """The data root does not have the ILSVRC-2012 layout; the message names the path at fault."""


@dataclass(frozen=True)
class Split:
    """Image paths with their class indices, in a fixed (sorted) order."""

    paths: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class ILSVRCLayout:
    root: Path
    wnids: list[str]
    names: list[str]
    train: Split
    val: Split

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def as_record(self) -> dict:
        """The layout as JSON data, its paths relative to the root: what the ranks that do not scan the folders read
        (data/index.py), about 40 bytes per image."""
        start = len(os.path.join(self.root, ""))

        def split_record(split: Split) -> dict:
            return {"paths": [path[start:] for path in split.paths], "labels": split.labels}

        splits = {"train": split_record(self.train), "val": split_record(self.val)}
        return {"wnids": self.wnids, "names": self.names, **splits}

    @classmethod
    def from_record(cls, root: str | os.PathLike, record: dict) -> ILSVRCLayout:
        """The layout of ``root`` that ``as_record`` wrote, without a look at the folders."""
        root = Path(root).expanduser()
        prefix = os.path.join(root, "")

        def split_of(data: dict) -> Split:
            return Split([prefix + path for path in data["paths"]], data["labels"])

        return cls(root, record["wnids"], record["names"], split_of(record["train"]), split_of(record["val"]))

    def subset(self, wnids: Sequence[str]) -> ILSVRCLayout:
        """The layout of these classes only (``data.classes``), indexed in their sorted order, the images in the order
        they had; a class it does not hold is an error naming it."""
        missing = sorted(set(wnids) - set(self.wnids))
        if missing:
            raise DatasetLayoutError(
                f"{self.root} holds {len(self.wnids)} classes, and not {len(missing)} of the {len(set(wnids))} "
                f"selected: {', '.join(missing[:5])}{' ...' * (len(missing) > 5)}"
            )
        kept = sorted(set(wnids))
        index = {self.wnids.index(wnid): new for new, wnid in enumerate(kept)}

        def split_of(split: Split) -> Split:
            pairs = [(path, index[label]) for path, label in zip(split.paths, split.labels) if label in index]
            return Split([path for path, _ in pairs], [label for _, label in pairs])

        names = [self.names[self.wnids.index(wnid)] for wnid in kept]
        return ILSVRCLayout(self.root, kept, names, split_of(self.train), split_of(self.val))

    def summary(self) -> str:
        text = (
            f"{self.root}: {self.num_classes} classes, {len(self.train):,} train images, {len(self.val):,} val images"
        )
        if self.num_classes == FULL_ILSVRC2012["classes"]:
            text += " (full ILSVRC-2012: {classes} / {train:,} / {val:,})".format(**FULL_ILSVRC2012)
        return text


def wordnet_names() -> dict[str, str]:
    """wnid -> first WordNet synonym for the 1000 ILSVRC-2012 classes (the project's class table)."""
    names = {}
    with open(CLASS_TABLE, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                _, wnid, synonyms = line.rstrip("\n").split("\t")
                names[wnid] = synonyms.split(",")[0]
    return names


@functools.cache
def is_a_paths() -> dict[str, tuple[str, ...]]:
    """wnid -> its WordNet is-a path from the root (``entity``) for the 1000 classes (the project's hierarchy table)."""
    paths = {}
    with open(HIERARCHY_TABLE, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                _, wnid, path = line.rstrip("\n").split("\t")
                paths[wnid] = tuple(path.split())
    return paths


def mistake_severity(true_wnid: str, predicted_wnid: str) -> int:
    """Height of the lowest common ancestor above the true class (Bertinetto et al., "Making Better Mistakes",
    CVPR 2020): 0 for a correct prediction, small for a sibling breed, large for an unrelated object."""
    paths = is_a_paths()
    true, predicted = paths[true_wnid], paths[predicted_wnid]
    shared = next((i for i, (a, b) in enumerate(zip(true, predicted)) if a != b), min(len(true), len(predicted)))
    return len(true) - shared


def _class_names(root: Path, wnids: list[str]) -> list[str]:
    known = wordnet_names()
    mapping = root / SYNSET_MAPPING
    if mapping.is_file():  # Kaggle's "n01440764 tench, Tinca tinca" lines take precedence
        for line in mapping.read_text(encoding="utf-8").splitlines():
            wnid, _, synonyms = line.partition(" ")
            known[wnid] = synonyms.split(",")[0]
    return [known.get(wnid, wnid) for wnid in wnids]


def _is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES


def _images_in(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.path for e in entries if _is_image(e))


def subfolders(folder: Path) -> list[str]:
    """The folders in ``folder``, sorted, hidden ones left out."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def scan_class_folders(split_dir: Path, class_index: dict[str, int]) -> Split:
    """Images of every class folder, scanned in parallel (a network file system rewards it)."""
    wnids = subfolders(split_dir)
    unknown = [w for w in wnids if w not in class_index]
    if unknown:
        raise DatasetLayoutError(f"{split_dir / unknown[0]}: class folder {unknown[0]!r} is not a class of train/")
    with ThreadPoolExecutor(max_workers=16) as pool:
        per_class = list(pool.map(_images_in, (str(split_dir / w) for w in wnids)))
    paths, labels = [], []
    for wnid, images in zip(wnids, per_class):
        paths += images
        labels += [class_index[wnid]] * len(images)
    return Split(paths, labels)


def _read_val_solution(csv_path: Path, class_index: dict[str, int]) -> dict[str, int]:
    """ImageId -> class index from Kaggle's LOC_val_solution.csv (first wnid of PredictionString)."""
    truth = {}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["ImageId", "PredictionString"]:
            raise DatasetLayoutError(f"{csv_path}: expected header 'ImageId,PredictionString', got {header}")
        for line_no, row in enumerate(reader, start=2):
            if len(row) != 2 or not row[1].split():
                raise DatasetLayoutError(f"{csv_path}:{line_no}: malformed row {row}")
            wnid = row[1].split()[0]
            if wnid not in class_index:
                raise DatasetLayoutError(
                    f"{csv_path}:{line_no}: image {row[0]} is labelled {wnid!r}, which is not a class of train/"
                )
            truth[row[0]] = class_index[wnid]
    return truth


def _scan_flat_val(root: Path, val_dir: Path, class_index: dict[str, int]) -> Split:
    candidates = [root / VAL_SOLUTION, val_dir / VAL_SOLUTION]
    csv_path = next((c for c in candidates if c.is_file()), None)
    if csv_path is None:
        raise DatasetLayoutError(
            f"{val_dir}: flat val/ needs its ground truth in {candidates[0]} or {candidates[1]} "
            "(or put val images in <wnid>/ class folders)"
        )
    truth = _read_val_solution(csv_path, class_index)
    images = _images_in(str(val_dir))
    by_id = {Path(p).stem: p for p in images}
    unlabelled = sorted(set(by_id) - set(truth))
    if unlabelled:
        raise DatasetLayoutError(f"{by_id[unlabelled[0]]}: not in {csv_path} ({len(unlabelled)} such images)")
    missing = sorted(set(truth) - set(by_id))
    if missing:
        raise DatasetLayoutError(f"{csv_path}: names {missing[0]!r}, which is not in {val_dir} ({len(missing)} such)")
    return Split(images, [truth[Path(p).stem] for p in images])


def load_layout(root: str | os.PathLike) -> ILSVRCLayout:
    """Scan and check ``root``; every failure names the path and what was expected there."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"data root {root} does not exist or is not a directory (set data.root=...)")
    train_dir, val_dir = root / "train", root / "val"
    for split_dir in (train_dir, val_dir):
        if not split_dir.is_dir():
            raise DatasetLayoutError(
                f"{split_dir} is missing: expected {root}/{{train,val}}/ in the ILSVRC-2012 layout"
            )
    wnids = subfolders(train_dir)
    if not wnids:
        raise DatasetLayoutError(f"{train_dir} has no class folders: expected {train_dir}/<wnid>/*.JPEG")
    class_index = {w: i for i, w in enumerate(wnids)}
    train = scan_class_folders(train_dir, class_index)
    empty = sorted(set(wnids) - {wnids[label] for label in set(train.labels)})
    if empty:
        raise DatasetLayoutError(f"{train_dir / empty[0]} holds no images ({len(empty)} such class folders)")
    val = (
        scan_class_folders(val_dir, class_index) if subfolders(val_dir) else _scan_flat_val(root, val_dir, class_index)
    )
    if not len(val):
        raise DatasetLayoutError(f"{val_dir} holds no images")
    return ILSVRCLayout(root, wnids, _class_names(root, wnids), train, val)
