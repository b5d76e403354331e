"""RandAugment, TrivialAugment Wide and random erasing (data/augment.py) in a DALI CPU pipeline and in torchvision, on
real JPEGs (the demo dataset's, and ILSVRC samples where ../shared holds them): they change most images, keep their
shape and type, repeat under the same seed, erase one rectangle of the mean colour, and DALI's deprecation warnings
stay out of the log."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from torchvision.transforms import v2

from data.augment import (
    DALI_ALIAS_WARNING,
    _pass_on,
    dali_augment,
    erase_fill,
    needs_conditionals,
    torchvision_augmentations,
)
from data.spec import AUTO_AUGMENTS, ImageSpec
from data.torchvision_backend import decode
from tests.conftest import SHARED_DATA

SIZE = 64
SAMPLES = 16
SOURCES = ("demo", "ilsvrc")


@pytest.fixture(params=SOURCES)
def jpegs(request: pytest.FixtureRequest) -> list[str]:
    """SAMPLES real JPEG files: the demo dataset's (always there) or ILSVRC's (where ../shared is)."""
    if request.param == "demo":
        root: Path = request.getfixturevalue("small_demo_root")
        files = sorted((root / "train").glob("*/*.JPEG"))[:: 240 // SAMPLES]
    else:
        files = sorted((SHARED_DATA / "imagenet-samples").glob("*.JPEG"))[:: 1000 // SAMPLES][:SAMPLES]
        if len(files) < SAMPLES:
            pytest.skip(f"needs {SAMPLES} ILSVRC samples in {SHARED_DATA / 'imagenet-samples'}")
    return [str(f) for f in files[:SAMPLES]]


@pipeline_def(batch_size=SAMPLES, num_threads=2, device_id=None)
def decoded_and_augmented(files: list[str], spec: ImageSpec):
    images = fn.resize(fn.decoders.image(fn.readers.file(files=files)[0], device="cpu"), size=[SIZE, SIZE])
    return images, dali_augment(fn.reshape(images, layout=""), spec)  # no layout, as the CPU pipeline's resize


def dali_run(files: list[str], spec: ImageSpec, seed: int = 7) -> tuple[np.ndarray, np.ndarray, list]:
    """One batch of the images resized to SIZE square and the same augmented, (N, H, W, C); and every warning the
    pipeline's definition issued, whatever the filters around it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = decoded_and_augmented(files, spec, seed=seed, enable_conditionals=needs_conditionals(spec))
        pipe.build()
    plain, augmented = pipe.run()
    return plain.as_array(), augmented.as_array(), caught


def torchvision_run(files: list[str], spec: ImageSpec, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """As ``dali_run``, by the torchvision loader's decoder and the transforms of ``torchvision_augmentations``."""
    plain = [v2.functional.resize(decode(f, spec), [SIZE, SIZE], antialias=True) for f in files]
    augment = v2.Compose(torchvision_augmentations(spec))
    torch.manual_seed(seed)
    augmented = [augment(image) for image in plain]
    return hwc(plain), hwc(augmented)


def hwc(images: list[torch.Tensor]) -> np.ndarray:
    return torch.stack(images).permute(0, 2, 3, 1).numpy()


def blanks(side: int):
    """A batch of black HWC images, ``side`` square, in a DALI pipeline."""
    return fn.constant(idata=0, shape=[side, side, 3], dtype=types.UINT8, layout="HWC")


def erased_fraction(plain: np.ndarray, erased: np.ndarray, fill: tuple[int, int, int]) -> float:
    """The area fraction of the one rectangle where ``erased`` differs from ``plain``, which must hold ``fill``
    throughout (0: nothing erased)."""
    changed = (plain != erased).any(axis=2)
    rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
    if rows.size == 0:
        return 0.0
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    assert (erased[box] == fill).all(), "the changed pixels are not one rectangle of the fill colour"
    return erased[box].shape[0] * erased[box].shape[1] / (plain.shape[0] * plain.shape[1])


def changed(plain: np.ndarray, augmented: np.ndarray) -> int:
    return sum(not np.array_equal(a, b) for a, b in zip(plain, augmented))


@pytest.mark.parametrize("auto_augment", AUTO_AUGMENTS)
def test_dali_auto_augment_changes_real_jpegs_quietly(
    jpegs: list[str], auto_augment: str, capfd: pytest.CaptureFixture
):
    plain, augmented, caught = dali_run(jpegs, ImageSpec(auto_augment=auto_augment))
    assert augmented.shape == plain.shape == (SAMPLES, SIZE, SIZE, 3) and augmented.dtype == np.uint8
    assert changed(plain, augmented) > SAMPLES // 2  # TrivialAugment's identity and zero magnitudes: ~10% unchanged
    assert [str(w.message) for w in caught] == []
    assert "deprecat" not in capfd.readouterr().err.lower()  # nor printed by DALI's C++ side


@pytest.mark.parametrize("auto_augment", AUTO_AUGMENTS)
def test_torchvision_auto_augment_changes_real_jpegs(jpegs: list[str], auto_augment: str):
    plain, augmented = torchvision_run(jpegs, ImageSpec(auto_augment=auto_augment))
    assert augmented.shape == plain.shape == (SAMPLES, SIZE, SIZE, 3) and augmented.dtype == np.uint8
    assert changed(plain, augmented) > SAMPLES // 2


def test_both_erase_one_rectangle_of_the_mean_colour_from_every_image(jpegs: list[str]):
    spec = ImageSpec(random_erasing=1.0)
    assert erase_fill(spec) == (124, 116, 104)
    for plain, erased in (dali_run(jpegs, spec)[:2], torchvision_run(jpegs, spec)):
        fractions = [erased_fraction(p, e, erase_fill(spec)) for p, e in zip(plain, erased)]
        assert all(0.015 <= f <= 0.35 for f in fractions), fractions  # 0.02-0.33, sides rounded to pixels


def test_the_same_seed_repeats_the_augmentations_and_another_does_not(small_demo_root: Path):
    files = [str(f) for f in sorted((small_demo_root / "train").glob("*/*.JPEG"))[:SAMPLES]]
    spec = ImageSpec(auto_augment="trivial_augment_wide", random_erasing=0.5)
    for run in (lambda seed: dali_run(files, spec, seed)[1], lambda seed: torchvision_run(files, spec, seed)[1]):
        first, again, other = run(1), run(1), run(2)
        assert np.array_equal(first, again)
        assert changed(first, other) > SAMPLES // 2


def test_dali_erases_with_the_spec_probability(small_demo_root: Path):
    files = [str(f) for f in sorted((small_demo_root / "train").glob("*/*.JPEG"))[:SAMPLES]]
    spec = ImageSpec(random_erasing=0.5)
    plain, erased, _ = dali_run(files, spec)
    fractions = [erased_fraction(p, e, erase_fill(spec)) for p, e in zip(plain, erased)]
    assert 3 <= sum(f > 0 for f in fractions) <= 13, fractions  # Binomial(16, 0.5): outside 3..13 in 0.4% of seeds


def test_dali_draws_rectangles_as_torchvision_does():
    """Over 512 blank images, DALI's rectangles and torchvision's have the same mean area and as many are tall."""
    spec, count = ImageSpec(random_erasing=1.0), 512

    @pipeline_def(batch_size=count, num_threads=2, device_id=None, seed=3)
    def erased_blanks():
        return dali_augment(blanks(SIZE), spec)

    pipe = erased_blanks()
    pipe.build()
    dali = pipe.run()[0].as_array()
    torch.manual_seed(3)
    erase = v2.Compose(torchvision_augmentations(spec))
    tv = hwc([erase(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)) for _ in range(count)])

    def boxes(images: np.ndarray) -> np.ndarray:
        """(area fraction, height over width) of each image's rectangle."""
        filled = (images == erase_fill(spec)).all(axis=3)
        heights, widths = filled.any(axis=2).sum(axis=1), filled.any(axis=1).sum(axis=1)
        assert (filled.sum(axis=(1, 2)) == heights * widths).all() and heights.min() > 0
        return np.stack([heights * widths / SIZE**2, heights / widths], axis=1)

    ours, theirs = boxes(dali), boxes(tv)
    assert abs(ours[:, 0].mean() - theirs[:, 0].mean()) < 0.02  # 0.175 drawn, ~0.004 standard error each
    assert abs((ours[:, 1] > 1).mean() - (theirs[:, 1] > 1).mean()) < 0.1
    assert ours[:, 1].min() < 0.4 and ours[:, 1].max() > 2.5  # the whole range of aspects


def test_dali_warns_of_its_deprecated_aliases_and_only_those_are_held_back():
    """Without the filter DALI's suites warn (so the quiet test above can fail); other warnings pass."""
    from nvidia.dali.auto_aug import trivial_augment

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_conditionals=True)
    def unfiltered():
        return trivial_augment.trivial_augment_wide(blanks(8))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unfiltered()
        warnings.warn("something else", DeprecationWarning, stacklevel=1)
    messages = [str(w.message) for w in caught if w.category is DeprecationWarning]
    assert len(messages) > 1 and all(DALI_ALIAS_WARNING.match(m) for m in messages[:-1]), messages

    with pytest.warns(DeprecationWarning) as passed:
        _pass_on(caught)
    assert [str(w.message) for w in passed] == ["something else"]


@pytest.mark.parametrize("kind", ["torchvision", "dali"])
@pytest.mark.parametrize("auto_augment", AUTO_AUGMENTS)
def test_each_train_loader_augments_as_its_spec_says(small_demo_root: Path, kind: str, auto_augment: str):
    """Through the loaders themselves (data/dali.py, data/torchvision_backend.py): the same seed and order with and
    without the automatic augmentation and erasing give the same labels, the same shapes, and other pixels."""
    from data.ilsvrc import load_layout
    from data.placement import BatchRequest, Placement, Shard
    from tests.loaders import NODES, small_spec

    split = load_layout(small_demo_root).train
    plain = small_spec(32, 36)
    augmented = ImageSpec(**{**plain.to_dict(), "auto_augment": auto_augment, "random_erasing": 0.5})
    options = dict(pin_memory=False) if kind == "torchvision" else dict(device="cpu")
    batches = {}
    for name, spec in (("plain", plain), ("augmented", augmented)):
        request = BatchRequest(split, spec, 40, Shard(), Placement(workers=1))
        loader = NODES[kind](**options).train(request, seed=3)
        batches[name] = next(iter(loader))
    (plain_images, plain_labels), (images, labels) = batches["plain"], batches["augmented"]
    assert torch.equal(labels, plain_labels) and images.shape == plain_images.shape == (40, 3, 32, 32)
    changed = (images.float() - plain_images.float()).abs().flatten(1).mean(1) > 0.05  # torchvision: uint8
    assert changed.sum() >= 30, f"{int(changed.sum())} of 40 images changed"
