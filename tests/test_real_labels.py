"""ReaL labels: the shipped copy is the published file, ReaL top-1 counts by hand on a small file (full and a class
subset), and every misuse is a ValueError that names the file or the path at fault."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from data.ilsvrc import wordnet_names
from data.real_labels import SHIPPED, ReaLLabels, real_accuracy, val_image_id

from .conftest import SHARED_DATA

WNIDS = sorted(wordnet_names())  # class index 0..999
# Val ids 1..8: three without a valid label (1, 4, 7), one with two (3).
SMALL = [[], [0], [1, 2], [], [3], [2, 0], [], [999]]


@pytest.fixture
def small(tmp_path: Path) -> ReaLLabels:
    path = tmp_path / "small_real.json"
    path.write_text(json.dumps(SMALL))
    return ReaLLabels.load(path)


def _val(image_id: int, folder: str = "") -> str:
    return f"/data/imagenet/val/{folder}{'/' if folder else ''}ILSVRC2012_val_{image_id:08d}.JPEG"


def test_shipped_copy_is_the_published_file():
    published = SHARED_DATA / "real" / "real.json"
    if not published.is_file():
        pytest.skip(f"{published} is absent (../shared holds the published ReaL labels on the development machine)")
    assert SHIPPED.read_bytes() == published.read_bytes()
    assert (SHIPPED.parent / "LICENSE").read_bytes() == (SHARED_DATA / "real" / "LICENSE").read_bytes()


def test_shipped_copy_has_the_published_counts_and_its_readme_its_sha256():
    labels = ReaLLabels.load()
    assert labels.path == SHIPPED
    assert len(labels.labels) == 50_000
    assert sum(not entry for entry in labels.labels) == 3_163
    assert sum(map(len, labels.labels)) == 57_553
    assert labels.labels[:2] == ((), (WNIDS[970], WNIDS[795]))  # the file's first entries: [], [970, 795]
    readme = (SHIPPED.parent / "README.md").read_text()
    assert (
        re.search(r"sha256 of `real.json`: `([0-9a-f]{64})`", readme)[1]
        == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    )


@pytest.mark.parametrize(
    "path, image_id",
    [
        ("ILSVRC2012_val_00000001.JPEG", 1),
        ("/data/val/n01440764/ILSVRC2012_val_00050000.jpeg", 50_000),
        ("val/ILSVRC2012_val_00000042.jpg", 42),
        ("val/ilsvrc2012_VAL_00000042.PNG", 42),
        ("val/ILSVRC2012_val_00000000.JPEG", None),  # ids start at 1
        ("val/ILSVRC2012_val_0000001.JPEG", None),  # seven digits
        ("val/ILSVRC2012_val_00000001.JPEG.bak", None),
        ("val/ILSVRC2012_val_00000001.webp", None),
        ("train/n01440764/n01440764_10026.JPEG", None),
        ("ILSVRC2012_val_00000001.JPEG/picture.JPEG", None),  # the file's own name counts, not a folder's
        ("/sets/in1k/val/val-000000.tar:ILSVRC2012_val_00000007", 7),  # a shard set's sample: <tar>:<key>
        ("/sets/in1k/val/val-000003.tar:val/ILSVRC2012_val_00000008", 8),
        ("/sets/in1k/val/val-000003.tar:val/ILSVRC2012_val_00000008x", None),
    ],
)
def test_val_image_id(path: str, image_id: int | None):
    assert val_image_id(path) == image_id


def test_real_top1_by_hand_over_all_classes(small: ReaLLabels):
    # Class folders and flat val/ alike: the file name alone finds the labels.
    paths = [_val(1), _val(2, WNIDS[0]), _val(3).replace(".JPEG", ".jpg"), _val(4), _val(5, WNIDS[3]), _val(6)]
    paths += [_val(7), _val(8, WNIDS[999])]
    top1 = [5, 0, 2, 0, 4, 1, 9, 999]
    original = [5, 0, 1, 0, 3, 2, 7, 998]
    # id:      1     2        3         4     5      6        7     8
    # ReaL:    []    [0]      [1, 2]    []    [3]    [2, 0]   []    [999]
    # top1:    -     0 yes    2 yes     -     4 no   1 no     -     999 yes   -> 3 of 5 counted: 0.6
    # orig:    -     0 yes    1 yes     -     3 yes  2 yes    -     998 no    -> 4 of 5: 0.8
    result = real_accuracy(paths, top1, WNIDS, small, original=original)
    assert (result.top1, result.counted, result.left_out, result.agreement) == (0.6, 5, 3, 0.8)
    assert result.source == str(small.path)
    assert json.loads(json.dumps(result.to_dict())) == {
        "top1": 0.6, "counted": 5, "left_out": 3, "source": str(small.path), "agreement": 0.8
    }  # fmt: skip
    assert "0.6000 on 5 images" in result.summary()


def test_a_class_subset_drops_the_labels_outside_it(small: ReaLLabels):
    classes = [WNIDS[0], WNIDS[1], WNIDS[3]]
    paths = [_val(i) for i in range(1, 9)]
    top1 = [0, 0, 2, 0, 2, 1, 0, 0]
    original = [0, 0, 1, 0, 2, 0, 0, 0]
    # id:      1     2        3                4     5        6                7     8
    # ReaL:    []    [0]      [1, 2]           []    [3]      [2, 0]           []    [999]
    # subset:  []    [w0]     [w1] (2 out)     []    [w3]     [w0] (2 out)     []    [] (999 out)
    # top1:    -     w0 yes   w3 no            -     w3 yes   w1 no            -     -     -> 2 of 4: 0.5
    # orig:    -     w0 yes   w1 yes           -     w3 yes   w0 yes           -     -     -> 4 of 4: 1.0
    result = real_accuracy(paths, top1, classes, small, original=original)
    assert (result.top1, result.counted, result.left_out, result.agreement) == (0.5, 4, 4, 1.0)


def test_no_counted_image_gives_no_accuracy_and_says_so(small: ReaLLabels):
    result = real_accuracy([_val(2), _val(8)], [0, 0], [WNIDS[500]], small, original=[0, 0])
    assert (result.top1, result.counted, result.left_out, result.agreement) == (None, 0, 2, None)
    assert "no image has a valid ReaL label" in result.summary()
    assert json.loads(json.dumps(result.to_dict()))["top1"] is None


@pytest.mark.parametrize(
    "paths, message",
    [
        (
            [_val(2), "/data/val/n01440764/n01440764_1.JPEG"],
            r"/data/val/n01440764/n01440764_1.JPEG: not an ILSVRC-2012",
        ),
        ([_val(2), _val(9)], r"ILSVRC2012_val_00000009.JPEG: val id 9 is beyond the 8 images of .*small_real.json"),
        (
            [_val(3, WNIDS[1]), _val(3)],
            rf"{re.escape(_val(3, WNIDS[1]))} and {re.escape(_val(3))}: both are val image 3",
        ),
    ],
)
def test_an_image_without_labels_or_counted_twice_is_an_error(small: ReaLLabels, paths: list[str], message: str):
    with pytest.raises(ValueError, match=message) as error:
        real_accuracy(paths, [0] * len(paths), WNIDS, small, original=[0] * len(paths))
    if "not an ILSVRC-2012" in message:
        assert str(small.path) in str(error.value)


def test_predictions_outside_the_classes_or_of_another_length_are_errors(small: ReaLLabels):
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000002.JPEG: prediction 3 is not an index into the 3"):
        real_accuracy([_val(2)], [3], WNIDS[:3], small, original=[0])
    with pytest.raises(ValueError, match="original label -1"):
        real_accuracy([_val(2)], [0], WNIDS[:3], small, original=[-1])
    with pytest.raises(ValueError, match="2 paths, 1 predictions and 2 original labels"):
        real_accuracy([_val(2), _val(3)], [0], WNIDS, small, original=[0, 0])


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[1], [2", "not a readable ReaL labels file"),
        ('{"1": [0]}', "expected a JSON list of at most 50,000 lists"),
        (json.dumps([[]] * 50_001), "expected a JSON list of at most 50,000 lists"),
        ("[[1], [], [1000]]", r"entry 2 \(ILSVRC2012_val_00000003\) is \[1000\], not a list of class indices 0..999"),
        ("[[1], [-1]]", r"entry 1 \(ILSVRC2012_val_00000002\) is \[-1\]"),
        ('[[1], ["2"]]', r"entry 1 \(ILSVRC2012_val_00000002\) is \['2'\]"),
        ("[[true]]", r"entry 0 \(ILSVRC2012_val_00000001\) is \[True\]"),
        ("[[1.0]]", r"entry 0 \(ILSVRC2012_val_00000001\) is \[1.0\]"),
        ("[[0], 1]", r"entry 1 \(ILSVRC2012_val_00000002\) is 1,"),
    ],
)
def test_a_malformed_file_is_an_error_naming_it_and_the_entry(tmp_path: Path, text: str, message: str):
    path = tmp_path / "bad_real.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{message}"):
        ReaLLabels.load(path)


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'absent.json'))}: not a readable"):
        ReaLLabels.load(tmp_path / "absent.json")
