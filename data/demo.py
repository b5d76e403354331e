"""The embedded demo dataset: a small ILSVRC-layout dataset generated on first use, identical on every machine.

Each class is its own shape filled with its own texture, drawn at a random place, size and angle in random
colours on a noisy background: shape and texture tell the classes apart, global colour never does.
Classes carry real ILSVRC-2012 wnids (every 100th of the 1000) so the same code paths run as on ImageNet.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.ilsvrc import CLASS_TABLE, VAL_SOLUTION

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the drawing changes: the cache folder name changes with it
SHAPES = ("disc", "triangle", "square", "pentagon", "hexagon", "star", "cross", "bar", "rhombus", "ring")
TEXTURES = (
    "stripes",
    "checker",
    "dots",
    "grid",
    "fine_stripes",
    "solid",
    "waves",
    "coarse_checker",
    "speckle",
    "rings",
)
ASPECT_RATIOS = (4 / 3, 3 / 4, 1.0, 3 / 2, 2 / 3, 5 / 4)  # ImageNet's common photo formats


def demo_wnids(num_classes: int) -> list[str]:
    """Every (1000 // num_classes)-th ILSVRC-2012 wnid, in sorted order."""
    with open(CLASS_TABLE, encoding="utf-8") as f:
        wnids = [line.split("\t")[1] for line in f if not line.startswith("#")]
    return wnids[:: len(wnids) // num_classes][:num_classes]


def _outline(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """Polar outline (angles, radii as a fraction of the size) of a shape centred on the origin."""
    if shape in ("disc", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return t, np.ones_like(t)
    corners = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}
    if shape in corners:
        n = corners[shape]
        return np.arange(n) * 2 * np.pi / n, np.ones(n)
    if shape == "star":
        return np.arange(10) * np.pi / 5, np.where(np.arange(10) % 2, 0.45, 1.0)
    half_width = {"cross": 0.4, "bar": 0.3, "rhombus": None}[shape]
    if shape == "rhombus":
        xy = [(1.0, 0.0), (0.0, 0.5), (-1.0, 0.0), (0.0, -0.5)]
    elif shape == "bar":
        xy = [(1.0, half_width), (-1.0, half_width), (-1.0, -half_width), (1.0, -half_width)]
    else:
        w = half_width
        xy = [
            (w, 1),
            (w, w),
            (1, w),
            (1, -w),
            (w, -w),
            (w, -1),
            (-w, -1),
            (-w, -w),
            (-1, -w),
            (-1, w),
            (-w, w),
            (-w, 1),
        ]
    return np.array([np.arctan2(y, x) for x, y in xy]), np.array([np.hypot(x, y) for x, y in xy])


def _mask(shape: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Boolean mask of the shape at a random place, size and angle."""
    r = rng.uniform(0.28, 0.42) * min(h, w)
    cx, cy, angle = rng.uniform(r, w - r), rng.uniform(r, h - r), rng.uniform(0, 2 * np.pi)
    t, radii = _outline(shape)
    polygon = [(cx + r * q * np.cos(a + angle), cy + r * q * np.sin(a + angle)) for a, q in zip(t, radii)]
    canvas = Image.new("L", (w, h))
    draw = ImageDraw.Draw(canvas)
    draw.polygon(polygon, fill=255)
    if shape == "ring":
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    return np.asarray(canvas) > 127


def _texture(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Boolean two-tone pattern of the given kind, at a random phase and orientation."""
    period = 0.12 * min(h, w)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + rng.uniform(0, period, 2)[:, None, None]
    theta = rng.uniform(0, np.pi)
    u, v = x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)
    cell_u, cell_v = (u % period) / period - 0.5, (v % period) / period - 0.5
    if kind == "stripes":
        return (u // period) % 2 == 0
    if kind == "fine_stripes":
        return (u // (period / 2.5)) % 2 == 0
    if kind == "checker":
        return ((u // period) + (v // period)) % 2 == 0
    if kind == "coarse_checker":
        return ((u // (2 * period)) + (v // (2 * period))) % 2 == 0
    if kind == "dots":
        return cell_u**2 + cell_v**2 < 0.09
    if kind == "grid":
        return (np.abs(cell_u) > 0.35) | (np.abs(cell_v) > 0.35)
    if kind == "waves":
        return ((u + 0.4 * period * np.sin(2 * np.pi * v / period)) // period) % 2 == 0
    if kind == "rings":
        return (np.hypot(x - x.mean(), y - y.mean()) // (0.6 * period)) % 2 == 0
    if kind == "speckle":
        cells = rng.random((h // 4 + 1, w // 4 + 1)) > 0.5
        return np.kron(cells, np.ones((4, 4), bool))[:h, :w]
    return np.ones((h, w), bool)  # solid


def render(label: int, rng: np.random.Generator, short_side: int) -> Image.Image:
    """One RGB image of class ``label``: its own shape filled with its own texture, in random colours."""
    aspect = ASPECT_RATIOS[rng.integers(len(ASPECT_RATIOS))]
    h, w = (short_side, round(short_side * aspect)) if aspect >= 1 else (round(short_side / aspect), short_side)
    background = rng.integers(0, 256, 3) * 0.6 + rng.normal(0, 18, (h, w, 3))
    colour = rng.integers(0, 256, 3)
    pattern = _texture(TEXTURES[label], rng, h, w)
    foreground = np.where(pattern[..., None], colour, 255 - colour)  # complementary tones: the texture always shows
    inside = _mask(SHAPES[label], rng, h, w)[..., None]
    return Image.fromarray(np.clip(np.where(inside, foreground, background), 0, 255).astype(np.uint8))


def _write(root: Path, num_classes: int, train_per_class: int, val_per_class: int, short_side: int, seed: int) -> None:
    wnids = demo_wnids(num_classes)
    rng = np.random.default_rng(seed)
    for label, wnid in enumerate(wnids):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(train_per_class):
            render(label, rng, short_side).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=90)
    (root / "val").mkdir()
    val_labels = [label for label in range(num_classes) for _ in range(val_per_class)]
    rng.shuffle(val_labels)
    with open(root / VAL_SOLUTION, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for i, label in enumerate(val_labels, start=1):
            image_id = f"ILSVRC2012_val_{i:08d}"
            render(label, rng, short_side).save(root / "val" / f"{image_id}.JPEG", quality=90)
            box = f"0 0 {short_side - 1} {short_side - 1}"  # whole-image box: the file keeps Kaggle's format
            writer.writerow([image_id, f"{wnids[label]} {box}"])


def ensure_demo_dataset(
    cache_dir: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 20,
    short_side: int = 96,
    seed: int = 0,
) -> Path:
    """Path of the demo dataset with these settings, generating it once (atomically: safe for concurrent ranks)."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"data.root.num_classes must be in 1..{len(SHAPES)} for the demo dataset, got {num_classes}")
    settings = f"v{FORMAT_VERSION}-{num_classes}-{train_per_class}-{val_per_class}-{short_side}-{seed}"
    root = Path(cache_dir).expanduser() / f"demo-{hashlib.sha1(settings.encode()).hexdigest()[:10]}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-staging-", dir=root.parent))
    log.info("Generating the demo dataset (%s) in %s", settings, root)
    try:
        _write(staging, num_classes, train_per_class, val_per_class, short_side, seed)
        staging.rename(root)
    except OSError:
        if not root.is_dir():  # a concurrent rank winning the rename is fine; anything else is not
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
