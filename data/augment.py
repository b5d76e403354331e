"""RandAugment, TrivialAugment Wide and random erasing (``data.spec``: ``auto_augment``, ``random_erasing``), for
both loaders from one ImageSpec: torchvision's transforms in the torchvision loader, DALI's automatic augmentation
module (``nvidia.dali.auto_aug``) and ``fn.erase`` inside the DALI pipeline, on either device.

Both run on 8-bit RGB after the random-resized crop and before normalisation, and are set to agree where the two
libraries' defaults differ: geometric operations fill with black (torchvision's default and the reference recipe's;
DALI's default is grey, 128) and interpolate bilinearly (DALI's default and the reference recipe's; torchvision's
default is nearest). Translations reach the same magnitudes: RandAugment's 150/331 of the side (DALI's default is
100/224), TrivialAugment's 32 pixels. Random erasing fills the rectangle with the mean colour rounded to 8 bits: the
images stay uint8 until normalised on the device, and the mean colour is what torchvision's reference recipe erases
to (value 0 after normalisation). What remains different between the two libraries:

- Operations: DALI's equalize follows OpenCV's formula, torchvision's PIL's; DALI's sharpness filters the 1-pixel
  border too, which torchvision (like PIL) leaves as it was; solarize inverts from 256 * (1 - m/30) in DALI, from
  255 * (1 - m/30) in torchvision (at magnitude 0 torchvision inverts pure white, DALI nothing); resampling and the
  rounding back to 8 bits are each library's own.
- Random erasing: torchvision draws again, up to 10 times, a rectangle that does not fit inside the image (and erases
  nothing after 10 misses); DALI's is drawn once and clipped to the image, so the rare rectangles longer than a side
  (about 0.4% of draws) are cut short instead of redrawn. Sides round half up (torchvision: half to even).
- Order: DALI mirrors in ``fn.crop_mirror_normalize``, after these augmentations; torchvision flips before them.
  Every operation's distribution is mirror-symmetric (signed shears and translations, centred rotations, uniformly
  placed rectangles), so the distribution of outputs is the same.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING

from torchvision.transforms import v2

from data.spec import ImageSpec

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode

MAGNITUDE_BINS = 31  # torchvision's and DALI's default; data.spec.rand_augment_magnitude counts in them
AUTO_AUGMENT_FILL = 0  # black: torchvision's default fill for the geometric operations
RAND_AUGMENT_TRANSLATE = 150 / 331  # torchvision's largest RandAugment translation, a fraction of the side
ERASE_SCALE = (0.02, 0.33)  # torchvision's RandomErasing defaults: the area fraction...
ERASE_RATIO = (0.3, 3.3)  # ...and the aspect ratio (height over width), drawn log-uniform
# DALI's RandAugment and TrivialAugment suites call these two operators by their deprecated experimental names.
DALI_ALIAS_WARNING = re.compile(r"WARNING: `nvidia\.dali\.fn\.experimental\.(equalize|filter)` is now deprecated\.")


def needs_conditionals(spec: ImageSpec) -> bool:
    """Whether the DALI pipeline must be built with ``enable_conditionals=True``: DALI's automatic augmentations pick
    each sample's operation with an ``if`` on a DALI node."""
    return spec.auto_augment is not None


def erase_fill(spec: ImageSpec) -> tuple[int, int, int]:
    """The mean colour in 8 bits: 0 once normalised, as torchvision's reference recipe erases after normalising."""
    return tuple(round(m) for m in spec.mean)


def torchvision_augmentations(spec: ImageSpec) -> list[v2.Transform]:
    """What follows the random-resized crop and flip in the torchvision loader, on uint8 (C, H, W) tensors."""
    transforms: list[v2.Transform] = []
    geometry = dict(interpolation=v2.InterpolationMode.BILINEAR, fill=AUTO_AUGMENT_FILL)
    if spec.auto_augment == "rand_augment":
        transforms.append(
            v2.RandAugment(spec.rand_augment_ops, spec.rand_augment_magnitude, MAGNITUDE_BINS, **geometry)
        )
    elif spec.auto_augment == "trivial_augment_wide":
        transforms.append(v2.TrivialAugmentWide(MAGNITUDE_BINS, **geometry))
    if spec.random_erasing > 0:
        transforms.append(
            v2.RandomErasing(spec.random_erasing, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=list(erase_fill(spec)))
        )
    return transforms


def dali_augment(images: DataNode, spec: ImageSpec) -> DataNode:
    """The spec's automatic augmentation and random erasing in a DALI pipeline, on HWC uint8 images on the CPU or the
    GPU, after the crop and resize and before ``fn.crop_mirror_normalize``. An automatic augmentation needs the
    pipeline built with ``enable_conditionals=True`` (``needs_conditionals``); the pipeline's seed draws everything."""
    from nvidia.dali import fn, types  # here: the torchvision loader imports this module and need not load DALI

    images = fn.reshape(images, layout="HWC")  # named: the CPU pipeline's resize (a python function) leaves none
    shape = images.shape(dtype=types.FLOAT)  # on the CPU whichever device holds the images (DALI's dynamic executor)
    if spec.auto_augment is not None:
        images = _auto_augment(images, spec, shape)
    if spec.random_erasing > 0:
        images = _random_erasing(images, spec, shape)
    return images


def _auto_augment(images: DataNode, spec: ImageSpec, shape: DataNode) -> DataNode:
    """DALI's RandAugment or TrivialAugment Wide, its warnings about deprecated names held back (``_pass_on``)."""
    from nvidia.dali.auto_aug import rand_augment, trivial_augment  # silent: the suites warn when called

    with warnings.catch_warnings(record=True) as caught:
        geometry = dict(fill_value=AUTO_AUGMENT_FILL, num_magnitude_bins=MAGNITUDE_BINS)
        if spec.auto_augment == "rand_augment":
            n, m = spec.rand_augment_ops, spec.rand_augment_magnitude
            images = rand_augment.rand_augment(
                images, n=n, m=m, shape=shape, max_translate_rel=RAND_AUGMENT_TRANSLATE, **geometry
            )
        else:  # without a shape its translations are absolute, 32 pixels at most, as torchvision's
            images = trivial_augment.trivial_augment_wide(images, **geometry)
    _pass_on(caught)
    return images


def _pass_on(caught: list[warnings.WarningMessage]) -> None:
    """Warns again what was caught, except DALI's warnings about its own suites' deprecated operator names: the user
    can do nothing about them. They are caught and not filtered because DALI warns inside a ``catch_warnings`` of its
    own that sets the ``default`` action first, which overrides any ``ignore`` filter set around the call."""
    for warning in caught:
        if not (warning.category is DeprecationWarning and DALI_ALIAS_WARNING.match(str(warning.message))):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _random_erasing(images: DataNode, spec: ImageSpec, shape: DataNode) -> DataNode:
    """torchvision's RandomErasing with ``spec.random_erasing``'s probability, as ``fn.erase`` arguments drawn per
    sample: an area fraction uniform in ``ERASE_SCALE``, an aspect log-uniform in ``ERASE_RATIO``, the sides rounded
    and clipped to the image's, the position uniform over where the rectangle fits."""
    from nvidia.dali import fn
    from nvidia.dali import math as dmath

    height, width = shape[0], shape[1]
    area = fn.random.uniform(range=ERASE_SCALE) * height * width
    aspect = dmath.exp(fn.random.uniform(range=[math.log(r) for r in ERASE_RATIO]))
    h = dmath.min(dmath.floor(dmath.sqrt(area * aspect) + 0.5), height)
    w = dmath.min(dmath.floor(dmath.sqrt(area / aspect) + 0.5), width)
    top = dmath.floor(fn.random.uniform(range=[0, 1]) * (height - h + 1))
    left = dmath.floor(fn.random.uniform(range=[0, 1]) * (width - w + 1))
    erased = fn.random.coin_flip(probability=spec.random_erasing)  # 0: an empty rectangle
    return fn.erase(
        images,
        anchor=fn.stack(top, left),
        shape=fn.stack(h, w) * erased,
        axis_names="HW",
        fill_value=list(erase_fill(spec)),
    )
