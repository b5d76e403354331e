"""The ILSVRC-2012 layout: class index, names, both val layouts, and the errors that name the path at fault."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from data.demo import demo_wnids
from data.ilsvrc import DatasetLayoutError, is_a_paths, load_layout, mistake_severity, wordnet_names


@pytest.fixture
def demo_copy(tmp_path: Path, small_demo_root: Path) -> Path:
    root = tmp_path / "imagenet"
    shutil.copytree(small_demo_root, root)
    return root


def _rewrite_solution(root: Path, edit) -> None:
    path = root / "LOC_val_solution.csv"
    rows = list(csv.reader(path.open()))
    edit(rows)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_flat_val_with_kaggle_solution(small_demo_root: Path):
    layout = load_layout(small_demo_root)
    assert layout.wnids == sorted(layout.wnids) == demo_wnids(4)
    assert (len(layout.train), len(layout.val)) == (240, 60)
    assert sorted(set(layout.train.labels)) == [0, 1, 2, 3]
    assert [layout.val.labels.count(c) for c in range(4)] == [15, 15, 15, 15]
    for path, label in zip(layout.val.paths, layout.val.labels):  # labels follow the csv, not file order
        row = next(r for r in csv.reader((small_demo_root / "LOC_val_solution.csv").open()) if r[0] == Path(path).stem)
        assert row[1].split()[0] == layout.wnids[label]
    assert layout.names[0] == wordnet_names()[layout.wnids[0]] == "tench"


def test_val_as_class_folders_gives_the_same_labels(demo_copy: Path):
    flat = load_layout(demo_copy)
    for path, label in zip(flat.val.paths, flat.val.labels):
        target = demo_copy / "val" / flat.wnids[label] / Path(path).name
        target.parent.mkdir(exist_ok=True)
        Path(path).rename(target)
    (demo_copy / "LOC_val_solution.csv").unlink()
    folders = load_layout(demo_copy)
    assert sorted(zip(map(lambda p: Path(p).name, folders.val.paths), folders.val.labels)) == sorted(
        zip(map(lambda p: Path(p).name, flat.val.paths), flat.val.labels)
    )


def test_stray_files_are_ignored_and_case_does_not_matter(demo_copy: Path):
    wnid_dir = next((demo_copy / "train").iterdir())
    (wnid_dir / "README.txt").write_text("not an image")
    (wnid_dir / ".DS_Store").write_bytes(b"\0")
    shutil.copy(next(wnid_dir.glob("*.JPEG")), wnid_dir / "extra.jpg")
    assert len(load_layout(demo_copy).train) == 241


def test_missing_root_is_named(tmp_path: Path):
    with pytest.raises(DatasetLayoutError, match=f"data root {tmp_path / 'nope'} does not exist"):
        load_layout(tmp_path / "nope")


def test_missing_split_is_named(demo_copy: Path):
    shutil.rmtree(demo_copy / "train")
    with pytest.raises(DatasetLayoutError, match=f"{demo_copy / 'train'} is missing"):
        load_layout(demo_copy)


def test_val_wnid_missing_from_train_is_named(demo_copy: Path):
    def relabel(rows):
        rows[5][1] = "n99999999 1 2 3 4"

    _rewrite_solution(demo_copy, relabel)
    with pytest.raises(DatasetLayoutError, match=r"LOC_val_solution.csv:6: image \S+ is labelled 'n99999999'"):
        load_layout(demo_copy)


def test_val_without_ground_truth_is_named(demo_copy: Path):
    (demo_copy / "LOC_val_solution.csv").unlink()
    with pytest.raises(DatasetLayoutError, match="flat val/ needs its ground truth"):
        load_layout(demo_copy)


def test_unlabelled_and_missing_val_images_are_named(demo_copy: Path):
    _rewrite_solution(demo_copy, lambda rows: rows.pop(1))
    with pytest.raises(DatasetLayoutError, match=r"ILSVRC2012_val_00000001.JPEG: not in .*LOC_val_solution.csv"):
        load_layout(demo_copy)
    _rewrite_solution(demo_copy, lambda rows: rows.insert(1, ["ILSVRC2012_val_00000001", "n01440764 1 1 2 2"]))
    (demo_copy / "val" / "ILSVRC2012_val_00000002.JPEG").unlink()
    with pytest.raises(DatasetLayoutError, match="names 'ILSVRC2012_val_00000002', which is not in"):
        load_layout(demo_copy)


def test_empty_class_folder_is_named(demo_copy: Path):
    (demo_copy / "train" / "n09999999").mkdir()
    with pytest.raises(DatasetLayoutError, match="n09999999 holds no images"):
        load_layout(demo_copy)


def test_every_class_has_an_is_a_path_from_the_wordnet_root():
    paths = is_a_paths()
    assert sorted(paths) == sorted(wordnet_names()) and len(paths) == 1000
    for wnid, path in paths.items():
        assert path[0] == "n00001740" and path[-1] == wnid  # entity ... the class itself
        assert len(set(path)) == len(path)


def test_mistake_severity_grows_with_distance_in_wordnet():
    chihuahua, japanese_spaniel, tabby_cat, ambulance = "n02085620", "n02085782", "n02123045", "n02701002"
    assert mistake_severity(chihuahua, chihuahua) == 0
    breeds = mistake_severity(chihuahua, japanese_spaniel)  # two toy dogs
    dog_cat = mistake_severity(chihuahua, tabby_cat)  # two carnivores
    dog_vehicle = mistake_severity(chihuahua, ambulance)  # an animal and an artifact
    # an animal and an artifact share entity, physical entity, object and whole
    assert 0 < breeds < dog_cat < dog_vehicle == len(is_a_paths()[chihuahua]) - 4
