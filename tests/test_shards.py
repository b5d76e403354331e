"""The converter (python -m data.shards): every good image once, byte for byte, under its key and class; broken files
listed, not shipped; equal shards, a mixed train permutation, val in ILSVRC id order; deterministic tars whose index
files DALI reads; reruns that write nothing, resumes that write only what is missing, plans that differ refused."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.demo import SHAPES, render
from data.ilsvrc import VAL_SOLUTION, load_layout, wordnet_names
from data.shard_set import ShardSet, ShardSplit, read_member
from data.shards import main, sample_key

from .conftest import SHARED_DATA

SAMPLES = SHARED_DATA / "imagenet-samples"
SHARD_SAMPLES = 5


@dataclass(frozen=True)
class Source:
    """A small ILSVRC layout of JPEGs (real ILSVRC ones where ../shared is present), and what its conversion must
    hold."""

    root: Path
    expected: dict[str, dict[str, tuple[bytes, int]]]  # split -> key -> (image bytes, class)
    broken: dict[str, bytes]  # path relative to root -> bytes


def _jpegs(count: int) -> list[bytes]:
    """``count`` real ILSVRC JPEGs from ../shared, or where it is absent (CI) as many demo JPEGs of ILSVRC's sizes."""
    if SAMPLES.is_dir():
        return [path.read_bytes() for path in sorted(SAMPLES.glob("*.JPEG"))[::40][:count]]
    rng, encoded = np.random.default_rng(0), []
    for i in range(count):
        buffer = io.BytesIO()
        render(i % len(SHAPES), rng, short_side=375).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def _write_layout(root: Path) -> Source:
    """4 classes: 16 train JPEGs (one named with a space and dots), a PNG named .JPEG and a truncated JPEG; a flat
    val/ of 7 JPEGs and an empty file, labelled by LOC_val_solution.csv."""
    images = _jpegs(25)
    wnids = sorted(wordnet_names())[::250]
    expected: dict[str, dict[str, tuple[bytes, int]]] = {"train": {}, "val": {}}
    for i, data in enumerate(images[:16]):
        wnid = wnids[i % 4]
        name = f"{wnid}_{i} copy.v2.JPEG" if i == 5 else f"{wnid}_{i}.JPEG"
        (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "train" / wnid / name).write_bytes(data)
        expected["train"][sample_key(f"train/{wnid}/{name}", "train")] = (data, i % 4)
    png = root / "train" / wnids[1] / f"{wnids[1]}_png.JPEG"
    with Image.open(io.BytesIO(images[16])) as image:
        image.resize((64, 48)).save(png, format="PNG")
    expected["train"][f"{wnids[1]}/{wnids[1]}_png"] = (png.read_bytes(), 1)
    broken = {f"train/{wnids[0]}/{wnids[0]}_broken.JPEG": images[17][:2000]}
    (root / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for k, data in enumerate(images[18:25], start=1):
        (root / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(data)
        expected["val"][f"ILSVRC2012_val_{k:08d}"] = (data, k % 4)
        rows.append(f"ILSVRC2012_val_{k:08d},{wnids[k % 4]} 1 2 3 4")
    broken["val/ILSVRC2012_val_00000008.JPEG"] = b""
    rows.append(f"ILSVRC2012_val_00000008,{wnids[0]} 1 2 3 4")
    (root / VAL_SOLUTION).write_text("\n".join(rows) + "\n")
    for relative, data in broken.items():
        (root / relative).write_bytes(data)
    return Source(root, expected, broken)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return _write_layout(tmp_path_factory.mktemp("ilsvrc") / "imagenet")


def _convert(root: Path, out: Path, cache_dir: Path, *options: str) -> int:
    return main(
        [
            str(root),
            str(out),
            "--shard-samples",
            str(SHARD_SAMPLES),
            "--workers",
            "2",
            "--cache-dir",
            str(cache_dir),
            *options,
        ]
    )


@pytest.fixture(scope="module")
def converted(source: Source, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("shards") / "imagenet"
    assert _convert(source.root, out, cache_dir) == 0
    return out


def _read_back(split: ShardSplit) -> list[tuple[str, str, bytes, bytes]]:
    """(key, image extension, image bytes, class text) of every sample, in reading order."""
    samples = []
    for shard, sample in split.samples():
        where = str(split.root / shard.tar)
        fd = os.open(where, os.O_RDONLY)
        try:
            image = read_member(fd, where, sample.image_name, sample.image)
            label = read_member(fd, where, sample.label_name, sample.label)
        finally:
            os.close(fd)
        samples.append((sample.key, sample.image_ext, image, label))
    return samples


def _files(out: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under ``out``: (inode, mtime, bytes)."""
    return {
        str(p.relative_to(out)): (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def test_every_good_image_once_under_its_key_and_class(source: Source, converted: Path):
    shard_set = ShardSet.open(converted)
    shard_set.verify()
    for name in ("train", "val"):
        split = getattr(shard_set, name)
        samples = _read_back(split)
        assert [key for key, *_ in samples] and len({key for key, *_ in samples}) == len(samples)
        found = {key: (image, int(label)) for key, _, image, label in samples}
        assert found == source.expected[name]
        counts = Counter(label for _, label in source.expected[name].values())
        assert list(split.per_class) == [counts[c] for c in range(4)]
        assert shard_set.manifest["splits"][name]["samples"] == len(samples)
    train = {key: ext for key, ext, *_ in _read_back(shard_set.train)}
    assert Counter(train.values()) == {"jpg": 16, "png": 1}  # by content: the PNG is named .JPEG
    assert [key for key in train if "copy" in key] == [f"{shard_set.wnids[1]}/{shard_set.wnids[1]}_5_copy_v2"]
    assert shard_set.manifest["label_digits"] == 1 and shard_set.manifest["classes"]["wnids"] == shard_set.wnids


def test_broken_files_are_listed_with_their_reasons_and_in_no_shard(source: Source, converted: Path):
    manifest = json.loads((converted / "manifest.json").read_text())
    excluded = {e["path"]: e["reason"] for name in ("train", "val") for e in manifest["splits"][name]["excluded"]}
    assert set(excluded) == set(source.broken)
    [truncated] = [p for p in excluded if p.startswith("train/")]
    assert excluded[truncated].startswith("truncated JPEG (no end marker")
    assert excluded["val/ILSVRC2012_val_00000008.JPEG"] == "empty file"
    tars = b"".join(p.read_bytes() for p in converted.rglob("*.tar"))
    assert source.broken[truncated] not in tars and b"broken" not in tars and b"val_00000008" not in tars
    assert manifest["source"]["files"] == {"train": 18, "val": 8}
    assert manifest["source"]["root"] == str(source.root) and manifest["source"]["index"] == "fast"


def test_equal_shards_one_seeded_permutation_and_val_in_id_order(source: Source, converted: Path):
    shard_set = ShardSet.open(converted)
    assert [s.samples for s in shard_set.train.shards] == [5, 4, 4, 4]  # 17 in ceil(17/5) = 4, equal +-1
    assert [s.samples for s in shard_set.val.shards] == [4, 3]
    layout = load_layout(source.root)
    start = len(str(source.root)) + 1
    keys = [sample_key(p[start:], "train") for p in layout.train.paths if "broken" not in p]
    permuted = [keys[i] for i in np.random.default_rng(0).permutation(len(keys))]
    assert [sample.key for _, sample in shard_set.train.samples()] == permuted
    for shard in shard_set.train.shards:
        classes = {int(label) for key, _, _, label in _read_back(replace(shard_set.train, shards=(shard,)))}
        assert len(classes) > 1, f"{shard.tar} holds one class"
    assert [sample.key for _, sample in shard_set.val.samples()] == [f"ILSVRC2012_val_{k:08d}" for k in range(1, 8)]


def test_tars_are_deterministic_and_indexed_as_dali_indexes_them(converted: Path, tmp_path: Path):
    from wds2idx import IndexCreator

    for tar_path in sorted(converted.rglob("*.tar")):
        with tarfile.open(tar_path) as tar:
            members = tar.getmembers()
        assert {(m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0o444, 0, 0, "", "")}
        assert [m.name.rsplit(".", 1)[1] for m in members[:2]] in (["jpg", "cls"], ["png", "cls"])
        with IndexCreator(str(tar_path), str(tmp_path / "dali.idx"), verbose=False) as creator:
            creator.create_index()
        assert (tmp_path / "dali.idx").read_bytes() == tar_path.with_suffix(".idx").read_bytes()


def test_dali_reads_every_sample_once_with_its_bytes(source: Source, converted: Path):
    from nvidia.dali import fn, pipeline_def

    shard_set = ShardSet.open(converted)
    for name in ("train", "val"):
        split = getattr(shard_set, name)

        @pipeline_def(batch_size=len(split), num_threads=1, device_id=None)
        def read(split: ShardSplit = split):
            return tuple(
                fn.readers.webdataset(
                    paths=split.tar_paths,
                    index_paths=split.index_paths,
                    ext=["jpg;png", "cls"],
                    missing_component_behavior="error",
                    name="reader",
                )
            )

        pipeline = read()
        pipeline.build()
        assert pipeline.epoch_size("reader") == len(split)
        images, labels = pipeline.run()
        read_back = Counter((images.at(i).tobytes(), int(labels.at(i).tobytes())) for i in range(len(split)))
        assert read_back == Counter(source.expected[name].values())


def test_a_rerun_writes_nothing(source: Source, converted: Path, cache_dir: Path, caplog):
    caplog.set_level(logging.INFO, logger="data.shards")
    before = _files(converted)
    assert _convert(source.root, converted, cache_dir) == 0
    assert _files(converted) == before
    assert "is complete" in caplog.text


def test_an_interrupted_conversion_writes_only_what_is_missing(
    source: Source, converted: Path, cache_dir: Path, tmp_path: Path
):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    finished = _files(out)
    (out / "manifest.json").unlink()
    (out / "train" / "train-000001.tar").unlink()
    (out / "train" / ".train-000002.tar.partial").write_bytes(b"half a shard")
    (out / "val" / ".val-000000.idx.partial").write_bytes(b"v1.2")
    assert _convert(source.root, out, cache_dir) == 0
    after = _files(out)
    assert sorted(after) == sorted(finished)  # the leftovers gone
    rewritten = {"train/train-000001.tar", "train/train-000001.idx", "manifest.json"}
    for path, (inode, mtime, data) in finished.items():
        assert (after[path][:2] == (inode, mtime)) == (path not in rewritten), path
        if path != "manifest.json":
            assert after[path][2] == data, path
    manifests = [json.loads(files["manifest.json"][2]) for files in (finished, after)]
    for manifest in manifests:
        del manifest["source"]["created"]
    assert manifests[0] == manifests[1]
    (out / "val" / "val-000001.tar").unlink()  # a manifest without all its shards is not complete
    assert _convert(source.root, out, cache_dir) == 0
    assert (out / "val" / "val-000001.tar").read_bytes() == finished["val/val-000001.tar"][2]


def test_a_damaged_finished_shard_is_named_not_rewritten(
    source: Source, converted: Path, cache_dir: Path, tmp_path: Path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    (out / "manifest.json").unlink()
    tar = out / "val" / "val-000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])
    assert _convert(source.root, out, cache_dir) == 2
    assert f"Delete {tar} and run again" in capsys.readouterr().err and tar.stat().st_size == 3000
    tar.unlink()
    assert _convert(source.root, out, cache_dir) == 0
    assert tar.read_bytes() == (converted / "val" / "val-000000.tar").read_bytes()


def test_another_seed_or_changed_source_is_refused(
    source: Source, converted: Path, cache_dir: Path, tmp_path: Path, capsys
):
    before = _files(converted)
    assert _convert(source.root, converted, cache_dir, "--seed", "1") == 2
    error = capsys.readouterr().err
    assert "seed 1 (OUT's plan: 0)" in error and "choose a new OUT" in error
    root = tmp_path / "imagenet"
    shutil.copytree(source.root, root)
    out = tmp_path / "out"
    assert _convert(root, out, cache_dir) == 0
    removed = next((root / "train").rglob("*_3.JPEG"))
    removed.unlink()
    (out / "manifest.json").unlink()
    assert _convert(root, out, cache_dir) == 2
    error = capsys.readouterr().err
    assert f"train: 1 files removed or now excluded, e.g. {removed.relative_to(root)}" in error
    assert _files(converted) == before and not (out / "manifest.json").exists()


def test_verify_names_a_shard_with_a_flipped_byte(converted: Path, tmp_path: Path, capsys):
    assert main(["--verify", str(converted), "--workers", "2"]) == 0
    assert "17 train images in 4 shards, 7 val images in 2 shards" in capsys.readouterr().out
    out = tmp_path / "out"
    shutil.copytree(converted, out)
    tar = out / "train" / "train-000002.tar"
    data = bytearray(tar.read_bytes())
    data[5000] ^= 0x01
    tar.write_bytes(data)
    assert main(["--verify", str(out), "--workers", "2"]) == 1
    error = capsys.readouterr().err
    assert f"{tar}: its SHA-256 differs" in error and "1 shards" in error


def test_one_split_a_second_run_elsewhere_identical_bytes(
    small_demo_root: Path, cache_dir: Path, tmp_path: Path, capsys
):
    both, train_only = tmp_path / "both", tmp_path / "train"
    assert _convert(small_demo_root, both, cache_dir) == 0
    assert _convert(small_demo_root, train_only, cache_dir, "--splits", "train", "--workers", "1") == 0
    shard_set = ShardSet.open(train_only)
    assert len(shard_set.val) == 0 and shard_set.val.shards == () and len(shard_set.train) == 240
    assert shard_set.manifest["source"]["splits"] == ["train"]
    for tar in (both / "train").iterdir():
        assert (train_only / "train" / tar.name).read_bytes() == tar.read_bytes()
    assert not (train_only / "val").exists()
    assert _convert(small_demo_root, train_only, cache_dir) == 2
    assert "splits ['train', 'val'] (OUT's plan: ['train'])" in capsys.readouterr().err


def test_keys_that_collide_after_sanitising_are_refused(small_demo_root: Path, cache_dir: Path, tmp_path: Path, capsys):
    root = tmp_path / "demo"
    shutil.copytree(small_demo_root, root)
    folder = next((root / "train").iterdir())
    image = next(folder.iterdir()).read_bytes()
    for name in ("a b.JPEG", "a_b.JPEG"):
        (folder / name).write_bytes(image)
    assert _convert(root, tmp_path / "out", cache_dir) == 2
    error = capsys.readouterr().err
    assert f"{folder / 'a b.JPEG'} and {folder / 'a_b.JPEG'} both become sample '{folder.name}/a_b'" in error
    assert not (tmp_path / "out").exists()


def test_user_errors_exit_with_a_message(small_demo_root: Path, cache_dir: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _convert(tmp_path / "missing", tmp_path / "out", cache_dir)
    assert exit_info.value.code == 2 and "ROOT" in capsys.readouterr().err
    (tmp_path / "no_layout" / "train" / "n01440764").mkdir(parents=True)
    assert _convert(tmp_path / "no_layout", tmp_path / "out", cache_dir) == 2
    assert "val is missing" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        _convert(small_demo_root, tmp_path / "a_file", cache_dir)
    assert exit_info.value.code == 2 and "is a file" in capsys.readouterr().err
    (tmp_path / "foreign" / "train").mkdir(parents=True)
    assert _convert(small_demo_root, tmp_path / "foreign", cache_dir) == 2
    assert "holds no plan.json" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and list((tmp_path / "foreign").iterdir()) == [
        tmp_path / "foreign" / "train"
    ]
