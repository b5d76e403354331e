"""Odd but valid image files, as real datasets and phones produce them, written by PIL: EXIF orientations 1 to 8,
grayscale, CMYK and progressive JPEGs, a JPEG followed by a trailer, a multi-picture (MPO) JPEG, RGB, 16-bit
grayscale, palette and RGBA PNGs (all named .JPEG, as ILSVRC has some), a 1x1 and a 10x3000 image."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
NAMES = (
    *(f"exif{tag}" for tag in range(1, 9)),
    *("grayscale", "cmyk", "progressive", "trailer", "one_pixel", "strip", "mpo"),
    *("rgb_png", "gray16_png", "palette_png", "rgba_png"),
)


def picture(height: int = 90, width: int = 120) -> Image.Image:
    """A colourful image with structure in both directions, so a rotation, a mirror or a swapped channel shows."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 2 % 256, y * 2 % 256, (x + y) % 256], axis=-1).astype(np.uint8))


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def write_odd_images(folder: Path, trailer_bytes: int = 4096) -> dict[str, Path]:
    """name -> path of each odd file (``NAMES``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    image, files = picture(), {}

    def save(name: str, data: bytes) -> None:
        files[name] = folder / f"{name}.JPEG"
        files[name].write_bytes(data)

    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        save(f"exif{orientation}", jpeg_bytes(image, exif=exif.tobytes()))
    save("grayscale", jpeg_bytes(image.convert("L")))
    save("cmyk", jpeg_bytes(image.convert("CMYK")))
    save("progressive", jpeg_bytes(image, progressive=True))
    save("trailer", jpeg_bytes(image) + os.urandom(trailer_bytes))  # motion-photo video, maker data
    save("one_pixel", jpeg_bytes(picture(1, 1)))
    save("strip", jpeg_bytes(picture(10, 3000)))
    buffer = io.BytesIO()
    image.save(buffer, "MPO", save_all=True, append_images=[picture(45, 60)])  # a phone's photo with its preview
    save("mpo", buffer.getvalue())
    for name, png in (
        ("rgb_png", image),
        ("gray16_png", Image.fromarray((np.mgrid[0:90, 0:120][1] * 547).astype(np.uint16))),
        ("palette_png", image.convert("P", palette=Image.Palette.ADAPTIVE)),
        ("rgba_png", Image.merge("RGBA", (*image.split(), image.convert("L")))),
    ):
        buffer = io.BytesIO()
        png.save(buffer, "PNG")
        save(name, buffer.getvalue())
    assert tuple(files) == NAMES
    return files
