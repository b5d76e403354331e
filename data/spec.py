"""The image spec: what an image becomes on its way to the model, built once from ``data.spec`` and handed unchanged
to every loader (DALI and torchvision, train, val and ten-crop), to ``predict.py``, ``eval.py`` and the benchmarks,
and saved in every checkpoint.

Where the pixels are made (device, output dtype, memory layout, threads) is placement, decided per run
(``data/placement.py``), and not part of the spec.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

PIXEL_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)  # ImageNet's RGB statistics, on the 0..255 scale
PIXEL_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
ORIENTATIONS = ("stored", "exif")
AUTO_AUGMENTS = ("rand_augment", "trivial_augment_wide")  # torchvision.transforms.v2 and nvidia.dali.auto_aug


class ConfigError(ValueError):
    """A config value that cannot work: the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``value`` as ``count`` finite floats, or None."""
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(map(math.isfinite, numbers)) else None


@dataclass(frozen=True)
class ImageSpec:
    """Train: a random crop of ``train_crop_scale`` of the image's area and ``train_aspect_ratio`` (width over
    height), resized to ``image_size`` square (or the epoch's size of a resolution schedule: data/resolution.py),
    mirrored with probability 0.5 when ``flip``; then ``auto_augment`` (``rand_augment`` with ``rand_augment_ops``
    operations of magnitude ``rand_augment_magnitude`` out of 31 bins, or ``trivial_augment_wide``), and a random
    rectangle erased to the mean colour with probability ``random_erasing`` (torchvision's scale 0.02-0.33 of the
    area, aspect 0.3-3.3). Val: the shorter side resized to ``val_resize_size`` (antialiased bilinear), then the
    centre ``val_image_size`` square (null: ``image_size``), whatever size training used; ten-crop takes the four
    corners, the centre and their mirrors.

    Pixels are 8-bit RGB whatever the file holds: grayscale is repeated into three channels, CMYK and YCCK JPEGs are
    converted, palettes expanded, 16-bit PNGs scaled to 8 bits, and alpha is dropped (the stored colour values,
    not composited on a background). ``orientation``: ``stored`` (the ILSVRC and torchvision convention: the pixel
    order the file stores, an EXIF orientation tag ignored) or ``exif`` (rotated and mirrored as the tag says, as a
    photo viewer shows it). Normalised with ``mean`` and ``std`` on the 0..255 scale.
    """

    image_size: int = 224
    val_resize_size: int = 256
    val_image_size: int | None = None
    train_crop_scale: tuple[float, float] = (0.08, 1.0)
    train_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    auto_augment: str | None = None
    rand_augment_ops: int = 2
    rand_augment_magnitude: int = 9
    random_erasing: float = 0.0
    orientation: str = "stored"
    mean: tuple[float, float, float] = PIXEL_MEAN
    std: tuple[float, float, float] = PIXEL_STD

    def __post_init__(self) -> None:
        def require(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise ConfigError(f"data.spec.{name}", list(value) if isinstance(value, tuple) else value, allowed)

        require(_whole(self.image_size, 1), "image_size", "a whole number of pixels >= 1")
        require(
            self.val_image_size is None or _whole(self.val_image_size, 1),
            "val_image_size",
            "a whole number of pixels >= 1, or null: image_size",
        )
        size = self.val_crop
        require(
            _whole(self.val_resize_size, size),
            "val_resize_size",
            f"a whole number >= data.spec.val_image_size ({size})",
        )
        scale, ratio = _numbers(self.train_crop_scale, 2), _numbers(self.train_aspect_ratio, 2)
        require(
            scale is not None and 0 < scale[0] <= scale[1] <= 1, "train_crop_scale", "[low, high], 0 < low <= high <= 1"
        )
        require(ratio is not None and 0 < ratio[0] <= ratio[1], "train_aspect_ratio", "[low, high], 0 < low <= high")
        require(isinstance(self.flip, bool), "flip", "true or false")
        require(self.auto_augment in (None, *AUTO_AUGMENTS), "auto_augment", f"null or {' or '.join(AUTO_AUGMENTS)}")
        require(_whole(self.rand_augment_ops, 1), "rand_augment_ops", "a whole number of operations >= 1")
        require(
            _whole(self.rand_augment_magnitude, 0) and self.rand_augment_magnitude <= 30,
            "rand_augment_magnitude",
            "a whole number 0..30 (of 31 magnitude bins, as torchvision and DALI count them)",
        )
        require(
            isinstance(self.random_erasing, int | float) and not isinstance(self.random_erasing, bool)
            and 0 <= self.random_erasing <= 1,
            "random_erasing",
            "a probability 0..1",
        )  # fmt: skip
        require(self.orientation in ORIENTATIONS, "orientation", " or ".join(ORIENTATIONS))
        mean, std = _numbers(self.mean, 3), _numbers(self.std, 3)
        require(mean is not None, "mean", "three numbers, one per RGB channel (0..255 scale)")
        require(std is not None and min(std) > 0, "std", "three numbers > 0, one per RGB channel (0..255 scale)")
        for name, value in (("train_crop_scale", scale), ("train_aspect_ratio", ratio), ("mean", mean), ("std", std)):
            object.__setattr__(self, name, value)  # tuples of floats, whatever the config gave (lists)

    @property
    def val_crop(self) -> int:
        """The val centre crop's side: ``val_image_size``, or where that is null ``image_size`` (kept null in the
        model card, so an ``image_size`` given to eval.py or predict.py sizes the crop as before it existed)."""
        return self.val_image_size or self.image_size

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for tuples): what checkpoints and exported weights carry."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageSpec:
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known})

    def differences(self, other: ImageSpec) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` where the two specs differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
