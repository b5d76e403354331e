"""One image policy for every loader: odd but valid files become the same 8-bit RGB pixels in DALI and torchvision,
with EXIF orientation ignored (ILSVRC's convention) or applied, as ``data.spec.orientation`` says."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from data.ilsvrc import Split
from data.placement import Placement
from data.torchvision_backend import decode, val_transform
from tests.loaders import loader, small_spec, unnormalised
from tests.odd_images import write_odd_images

ROUNDING = {"gray16_png": 1.0}  # 16 -> 8 bits: DALI rounds to nearest, torchvision truncates


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_odd_images(tmp_path_factory.mktemp("odd"))


def _val_pixels(kind: str, files: dict[str, Path], spec) -> torch.Tensor:
    split = Split([str(p) for p in files.values()], list(range(len(files))))
    batches = loader(kind, split, train=False, batch_size=4, spec=spec, placement=Placement(workers=1))
    images = torch.cat([images for images, _ in batches])
    return unnormalised(images, spec) if kind == "dali" else images.float()


@pytest.mark.parametrize("orientation", ["stored", "exif"])
def test_dali_and_torchvision_make_the_same_val_pixels(odd_files: dict[str, Path], orientation: str):
    spec = replace(small_spec(32, 36), orientation=orientation)
    ours, theirs = _val_pixels("dali", odd_files, spec), _val_pixels("torchvision", odd_files, spec)
    assert ours.shape == theirs.shape == (len(odd_files), 3, 32, 32)
    for name, a, b in zip(odd_files, ours, theirs):
        assert (a - b).abs().max() <= ROUNDING.get(name, 0.0) + 0.01, name


@pytest.mark.parametrize("orientation", ["stored", "exif"])
def test_exif_orientation_is_applied_only_when_asked(odd_files: dict[str, Path], orientation: str):
    """Against PIL's own reading of the tag (``ImageOps.exif_transpose``), through the same resize and crop."""
    spec = replace(small_spec(32, 36), orientation=orientation)
    pixels = _val_pixels("dali", odd_files, spec)
    names = list(odd_files)
    for tag in range(1, 9):
        with Image.open(odd_files[f"exif{tag}"]) as image:
            shown = ImageOps.exif_transpose(image) if orientation == "exif" else image.copy()
        reference = val_transform(spec)(torch.from_numpy(np.array(shown.convert("RGB"))).permute(2, 0, 1))
        assert (pixels[names.index(f"exif{tag}")] - reference.float()).abs().max() <= 1, tag
        rotated = orientation == "exif" and tag >= 5  # tags 5-8 swap width and height
        assert decode(str(odd_files[f"exif{tag}"]), spec).shape == ((3, 120, 90) if rotated else (3, 90, 120))


def test_colour_conversions(odd_files: dict[str, Path]):
    """Alpha is dropped (the stored colour values), 16-bit grey scaled to 8 bits, grey repeated into RGB."""
    spec = small_spec(32, 36)
    with Image.open(odd_files["rgba_png"]) as rgba:
        stored = torch.from_numpy(np.array(rgba)).permute(2, 0, 1)
    assert torch.equal(decode(str(odd_files["rgba_png"]), spec), stored[:3])
    with Image.open(odd_files["gray16_png"]) as gray:
        grey16 = torch.from_numpy(np.array(gray).astype(np.int64))
    decoded = decode(str(odd_files["gray16_png"]), spec)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded[0].long(), grey16 >> 8)
    assert torch.equal(decoded[0], decoded[1]) and torch.equal(decoded[1], decoded[2])
