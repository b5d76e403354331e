"""ReaL labels (Beyer et al. 2020, "Are we done with ImageNet?"): the set of valid ILSVRC-2012 classes per val image,
and ReaL top-1 accuracy, which does not count a prediction of a second object in the picture, or of a near-duplicate
class, as a mistake.

Images are matched to the labels by their file name (``ILSVRC2012_val_00000001.JPEG``), not by their order, so a
class-folder or flat val/, a subset of its images or of its classes all give the same answer per image.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from data.ilsvrc import FULL_ILSVRC2012, wordnet_names

SHIPPED = Path(__file__).with_name("real") / "real.json"
_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})(?:\.(?:jpe?g|png))?", re.IGNORECASE)


def val_image_id(path: str) -> int | None:
    """The id (1..) of an ILSVRC-2012 val file ``ILSVRC2012_val_%08d.JPEG`` (jpg, png, any case) anywhere in a
    folder tree, or of a shard set's sample ``<tar>:[<folder>/]ILSVRC2012_val_%08d`` (its key), else None."""
    match = _VAL_NAME.fullmatch(os.path.basename(path).rsplit(":", 1)[-1])
    image_id = int(match[1]) if match else 0
    return image_id or None  # ILSVRC2012_val_00000000 names no image


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ReaLLabels:
    """The wnids of the valid labels of each val image (``labels[id - 1]``, empty where none is valid), read from
    ``path``; a file shorter than the 50,000 val images (a test's) covers the first ids only."""

    path: Path
    labels: tuple[tuple[str, ...], ...] = field(repr=False)

    @classmethod
    def load(cls, path: str | os.PathLike = SHIPPED) -> ReaLLabels:
        """Read and check a ReaL file: a JSON list of lists of class indices 0..999 (sorted-wnid order)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{path}: not a readable ReaL labels file (a JSON list of lists of class indices): {e}"
            ) from e
        wnids = sorted(wordnet_names())
        if not isinstance(data, list) or len(data) > FULL_ILSVRC2012["val"]:
            raise ValueError(
                f"{path}: expected a JSON list of at most {FULL_ILSVRC2012['val']:,} lists of class indices"
            )
        for position, entry in enumerate(data):
            if not isinstance(entry, list) or not all(_whole(i) and 0 <= i < len(wnids) for i in entry):
                raise ValueError(
                    f"{path}: entry {position} (ILSVRC2012_val_{position + 1:08d}) is {entry!r}, "
                    f"not a list of class indices 0..{len(wnids) - 1}"
                )
        return cls(path, tuple(tuple(wnids[i] for i in entry) for entry in data))

    def of(self, path: str) -> tuple[str, ...]:
        """The valid wnids of the val image at ``path``; a ValueError names a path that is not a val image, or whose
        id the file does not reach."""
        image_id = val_image_id(path)
        if image_id is None:
            raise ValueError(
                f"{path}: not an ILSVRC-2012 val image name (ILSVRC2012_val_%08d.JPEG), which ReaL labels "
                f"({self.path}) need to find an image's labels"
            )
        if image_id > len(self.labels):
            raise ValueError(f"{path}: val id {image_id} is beyond the {len(self.labels):,} images of {self.path}")
        return self.labels[image_id - 1]


@dataclass(frozen=True)
class ReaLResult:
    """ReaL top-1 over the ``counted`` images with a valid label among the evaluated classes (None where there is
    none); ``left_out`` images had none. ``agreement``: the fraction of counted images whose own (original) label is
    among their valid ones: high on ILSVRC-2012 val, and where it is low the images are not ILSVRC's, though named
    like them (the demo dataset's)."""

    top1: float | None
    counted: int
    left_out: int
    source: str
    agreement: float | None

    def summary(self) -> str:
        if self.top1 is None:
            return f"ReaL top-1: no image has a valid ReaL label among the evaluated classes ({self.source})"
        return (
            f"ReaL top-1 {self.top1:.4f} on {self.counted:,} images ({self.left_out:,} without a valid label left out; "
            f"original labels agree with ReaL on {self.agreement:.4f}) from {self.source}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def real_accuracy(
    paths: Sequence[str],
    top1: Sequence[int],
    classes: Sequence[str],
    labels: ReaLLabels,
    *,
    original: Sequence[int],
) -> ReaLResult:
    """ReaL top-1 of the predictions ``top1[i]`` (indices into the evaluated ``classes``, wnids) for the val images
    ``paths[i]`` whose dataset labels are ``original[i]``. With a subset of the 1000 classes, an image's valid labels
    are those among ``classes``; an image left with none is left out, as one that has none at all."""
    if not len(paths) == len(top1) == len(original):
        raise ValueError(f"{len(paths)} paths, {len(top1)} predictions and {len(original)} original labels")
    evaluated = set(classes)
    first_path: dict[int, str] = {}
    counted = correct = agree = 0
    for path, predicted, label in zip(paths, top1, original):
        valid = [wnid for wnid in labels.of(path) if wnid in evaluated]
        image_id = val_image_id(path)
        if image_id in first_path:
            raise ValueError(f"{first_path[image_id]} and {path}: both are val image {image_id}, counted once only")
        first_path[image_id] = path
        for name, index in (("prediction", predicted), ("original label", label)):
            if not 0 <= int(index) < len(classes):
                raise ValueError(f"{path}: {name} {index} is not an index into the {len(classes)} evaluated classes")
        if valid:
            counted += 1
            correct += classes[int(predicted)] in valid
            agree += classes[int(label)] in valid
    return ReaLResult(
        top1=correct / counted if counted else None,
        counted=counted,
        left_out=len(paths) - counted,
        source=str(labels.path),
        agreement=agree / counted if counted else None,
    )
