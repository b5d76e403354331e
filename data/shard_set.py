"""A shard set: a dataset as WebDataset tar shards with DALI index files and a manifest, written by
``python -m data.shards`` (data/shards.py) and read by both loaders when ``data.root`` names its folder.

    <root>/manifest.json                       written last: a set without one is not finished
    <root>/train/train-000000.tar (.idx)       the train set in one seeded permutation, equal shards
    <root>/val/val-000000.tar (.idx)           val in ILSVRC id order, each sample keyed by its id

A sample is two members with one key (``n01440764/n01440764_10026``, ``ILSVRC2012_val_00000001``):
``<key>.jpg`` (or ``.png``) holds the original file's bytes, ``<key>.cls`` its class index as ASCII digits padded
to ``label_digits`` (webdataset's ``cls`` convention, read by ``int()``; fixed width so that a DALI pipeline parses
it with arithmetic). The ``.idx`` file is DALI's index (``wds2idx`` v1.2): one line per sample, each member's
extension, data offset, size and name, so that no reader scans a tar to find its samples.

Opening a set checks what is cheap (the manifest; each shard's and index's size, one ``stat`` each; each index's
sample count and its last sample's tar header, a few small reads); every sample and the checksums are checked by
``python -m data.shards --verify ROOT``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "imagenet-pipeline-shards"
VERSION = 1
INDEX_VERSION = "v1.2"
IMAGE_EXTENSIONS = ("jpg", "png")
LABEL_EXTENSION = "cls"
SPLITS = ("train", "val")
HASH_CHUNK = 1 << 22
TAR_HEADER = 512


class ShardSetError(ValueError):
    """A shard set that cannot be read as its manifest says: the message names the file (and sample) at fault."""


def verify_advice(root: str | os.PathLike) -> str:
    """What to run when a sample of the set at ``root`` cannot be read: the check that names the shard and sample."""
    return (
        f"A sample of the shard set {root} cannot be read: `python -m data.shards --verify {root}` names the shard "
        "and the sample at fault (convert again into a new folder to replace it)"
    )


def is_shard_set(root: str | os.PathLike) -> bool:
    """Whether ``root`` is a shard set's folder (it holds a manifest) rather than an ILSVRC folder layout."""
    return (Path(root).expanduser() / MANIFEST).is_file()


def label_text(label: int, digits: int) -> bytes:
    """The ``.cls`` member of a sample of class ``label``."""
    return str(label).zfill(digits).encode("ascii")


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Member:
    """Where one member's bytes lie in its tar."""

    offset: int
    size: int


def read_member(fd: int, where: str, name: str, member: Member) -> bytes:
    """The bytes of tar member ``name`` from the open tar ``fd``, read with its 512-byte header in one ``pread``; a
    header that names another member means the index does not match the tar (``where`` names the shard)."""
    data = os.pread(fd, TAR_HEADER + member.size, member.offset - TAR_HEADER)
    header_name = data[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if len(data) != TAR_HEADER + member.size or header_name != name:
        found = f"tar member {header_name!r}" if len(data) == TAR_HEADER + member.size else "the end of the file"
        raise ShardSetError(
            f"{where}: sample {name.rsplit('.', 1)[0]!r}: its index places {name} at byte {member.offset}, where "
            f"the tar has {found}: the index does not match its shard (truncated or replaced: python -m data.shards "
            "--verify names every such file)"
        )
    return data[TAR_HEADER:]


def parse_label(text: bytes, digits: int, num_classes: int, where: str, key: str) -> int:
    """The class index a ``.cls`` member holds; anything but ``digits`` ASCII digits naming a class is an error."""
    if len(text) != digits or not text.isdigit() or int(text) >= num_classes:
        raise ShardSetError(
            f"{where}: sample {key!r} has class {text[:16]!r}: expected {digits} digits naming one of "
            f"{num_classes} classes (a shard written by another tool, or damaged)"
        )
    return int(text)


@dataclass(frozen=True)
class IndexedSample:
    """One sample of a shard as its index file places it: the image member (with its extension) and the label one."""

    key: str
    image_ext: str
    image: Member
    label: Member

    @property
    def image_name(self) -> str:
        return f"{self.key}.{self.image_ext}"

    @property
    def label_name(self) -> str:
        return f"{self.key}.{LABEL_EXTENSION}"


@dataclass(frozen=True, eq=False)
class IndexTable:
    """The samples of an index file as columns, numpy arrays rather than an ``IndexedSample`` each: a reader of a
    million samples holds a few arrays, not millions of Python objects that every forked worker would copy as
    reference counting writes to their pages (data/shard_reader.py)."""

    keys: bytes  # every sample's key, UTF-8, one after another
    key_starts: np.ndarray  # int64, one more than samples: sample i's key is keys[key_starts[i] : key_starts[i + 1]]
    image_ext: np.ndarray  # uint8: the image member's extension, an index into IMAGE_EXTENSIONS
    image_offset: np.ndarray  # int64: the image member's data offset in the tar
    image_size: np.ndarray  # int64
    label_offset: np.ndarray  # int64: the class member's
    label_size: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.image_ext)

    def sample(self, index: int) -> IndexedSample:
        """Sample ``index`` (negative counts from the end) as ``read_index`` lists it."""
        i = range(len(self))[index]
        return IndexedSample(
            self.keys[self.key_starts[i] : self.key_starts[i + 1]].decode("utf-8"),
            IMAGE_EXTENSIONS[self.image_ext[i]],
            Member(int(self.image_offset[i]), int(self.image_size[i])),
            Member(int(self.label_offset[i]), int(self.label_size[i])),
        )


def read_index_table(index_path: str | os.PathLike, tar_size: int | None = None) -> IndexTable:
    """The samples a DALI index file lists, as columns, checked against the format this project writes (and, given
    ``tar_size``, against the tar's size): a mismatch is a ``ShardSetError`` naming the index, line and sample."""
    index_path = Path(index_path)
    try:
        lines = index_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ShardSetError(f"{index_path}: cannot be read as a DALI index file ({error})") from error
    header = lines[0].split() if lines else []
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardSetError(f"{index_path}:1: expected the header '{INDEX_VERSION} <samples>', got {lines[:1]}")
    if int(header[1]) != len(lines) - 1:
        raise ShardSetError(f"{index_path}: its header counts {header[1]} samples, it lists {len(lines) - 1}")
    keys, ext_codes, numbers = [], [], []  # numbers: image offset and size, label offset and size, per sample
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        members: dict[str, tuple[int, int, str]] = {}  # extension: offset, size, name
        try:
            for i in range(0, len(fields), 4):
                ext, offset, size, name = fields[i : i + 4]
                members[ext] = (int(offset), int(size), name)
        except ValueError:
            raise ShardSetError(f"{index_path}:{line_no}: malformed index line {line!r}") from None
        image_exts = [ext for ext in members if ext in IMAGE_EXTENSIONS]
        key = next(iter(members.values()))[2].rsplit(".", 1)[0] if members else "?"
        if len(image_exts) != 1 or LABEL_EXTENSION not in members:
            raise ShardSetError(
                f"{index_path}:{line_no}: sample {key!r} has members {sorted(members)}: expected one image "
                f"({' or '.join(IMAGE_EXTENSIONS)}) and its class ({LABEL_EXTENSION})"
            )
        for offset, size, name in members.values():
            if tar_size is not None and (offset < 0 or offset + size > tar_size):
                raise ShardSetError(
                    f"{index_path}:{line_no}: {name} lies at bytes {offset}..{offset + size}, "
                    f"past the end of its tar ({tar_size} bytes): the index does not match its shard"
                )
        ext = image_exts[0]
        keys.append(key.encode("utf-8"))
        ext_codes.append(IMAGE_EXTENSIONS.index(ext))
        numbers += (*members[ext][:2], *members[LABEL_EXTENSION][:2])
    try:
        columns = np.array(numbers, dtype=np.int64).reshape(-1, 4).T.copy()
    except OverflowError:
        raise ShardSetError(f"{index_path}: an offset or size beyond 64 bits: not an index of this project") from None
    key_starts = np.zeros(len(keys) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, keys), dtype=np.int64, count=len(keys)), out=key_starts[1:])
    return IndexTable(b"".join(keys), key_starts, np.array(ext_codes, dtype=np.uint8), *columns)


def read_index(index_path: str | os.PathLike, tar_size: int | None = None) -> list[IndexedSample]:
    """The samples a DALI index file lists, checked as ``read_index_table`` checks them."""
    table = read_index_table(index_path, tar_size)
    starts = table.key_starts.tolist()
    return [
        IndexedSample(table.keys[start:end].decode("utf-8"), IMAGE_EXTENSIONS[ext], Member(*image), Member(*label))
        for start, end, ext, image, label in zip(
            starts[:-1],
            starts[1:],
            table.image_ext.tolist(),
            zip(table.image_offset.tolist(), table.image_size.tolist()),
            zip(table.label_offset.tolist(), table.label_size.tolist()),
        )
    ]


@dataclass(frozen=True)
class Shard:
    """One tar and its index, as the manifest records them (paths relative to the set's root)."""

    tar: str
    index: str
    samples: int
    bytes: int
    index_bytes: int
    sha256: str
    index_sha256: str

    def check_sizes(self, root: Path) -> None:
        """Both files exist with the sizes the manifest records (one ``stat`` each)."""
        for relative, size in ((self.tar, self.bytes), (self.index, self.index_bytes)):
            path = root / relative
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                raise ShardSetError(f"{path}: missing, but {root / MANIFEST} lists it") from None
            if actual != size:
                raise ShardSetError(
                    f"{path}: {actual} bytes, but {root / MANIFEST} records {size} (truncated or rewritten): "
                    f"convert again (python -m data.shards ... {root}) or restore the file"
                )

    def check_index(self, root: Path) -> None:
        """The index's header counts the manifest's samples, and its last member is where the tar has it (a few small
        reads): an index swapped with another shard's is found at start, not as a decoding error."""
        path = root / self.index
        with open(path, "rb") as f:
            header = f.readline().split()
            f.seek(max(0, self.index_bytes - 4096))
            last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1].decode("utf-8", "replace").split()
        try:
            counted, name = int(header[1]), last[-1]
            member = Member(int(last[-3]), int(last[-2]))
        except (IndexError, ValueError):
            raise ShardSetError(f"{path}: not a DALI index file ({INDEX_VERSION}) of this project's format") from None
        if counted != self.samples:
            raise ShardSetError(f"{path}: counts {counted} samples, {root / MANIFEST} {self.samples} for its shard")
        tar = root / self.tar
        fd = os.open(tar, os.O_RDONLY)
        try:
            read_member(fd, str(tar), name, Member(member.offset, 0))  # its header only
        finally:
            os.close(fd)

    def labelled_keys(self, root: Path, label_digits: int, num_classes: int) -> list[tuple[str, int]]:
        """(key, class) of every sample, in order, after checking that each member lies where its index says and
        that each class is the set's digits naming a class: faults named by their sample."""
        where = str(root / self.tar)
        fd = os.open(where, os.O_RDONLY)
        try:
            labelled = []
            for sample in read_index(root / self.index, tar_size=self.bytes):
                read_member(fd, where, sample.image_name, sample.image)
                label = read_member(fd, where, sample.label_name, sample.label)
                labelled.append((sample.key, parse_label(label, label_digits, num_classes, where, sample.key)))
        finally:
            os.close(fd)
        return labelled

    def verify(self, root: Path, label_digits: int, num_classes: int) -> None:
        """Every sample checked (``labelled_keys``: faults named by sample first), then the checksums the manifest
        records (any other change to the bytes)."""
        self.check_sizes(root)
        samples = len(self.labelled_keys(root, label_digits, num_classes))
        if samples != self.samples:
            raise ShardSetError(f"{root / self.index}: lists {samples} samples, the manifest {self.samples}")
        for relative, digest in ((self.tar, self.sha256), (self.index, self.index_sha256)):
            if file_sha256(root / relative) != digest:
                raise ShardSetError(f"{root / relative}: its SHA-256 differs from {root / MANIFEST}'s")


@dataclass(frozen=True)
class ShardSplit:
    """One split of a shard set: its shards in order, its sample count per class, and the width of its labels."""

    root: Path
    shards: tuple[Shard, ...]
    per_class: tuple[int, ...]
    label_digits: int

    @property
    def num_classes(self) -> int:
        return len(self.per_class)

    def __len__(self) -> int:
        return sum(shard.samples for shard in self.shards)

    @property
    def tar_paths(self) -> list[str]:
        return [str(self.root / shard.tar) for shard in self.shards]

    @property
    def index_paths(self) -> list[str]:
        return [str(self.root / shard.index) for shard in self.shards]

    def samples(self) -> list[tuple[Shard, IndexedSample]]:
        """Every sample in reading order, from the index files (one small read per shard)."""
        return [(shard, s) for shard in self.shards for s in read_index(self.root / shard.index, shard.bytes)]

    @cached_property
    def paths(self) -> list[str]:
        """A name per sample, ``<tar>:<key>``, in reading order (reports and per-image outputs name samples so)."""
        return [f"{self.root / shard.tar}:{sample.key}" for shard, sample in self.samples()]


@dataclass(frozen=True)
class ShardSet:
    """A converted dataset, read from its manifest: the layout both loaders take in place of folders."""

    root: Path
    wnids: list[str]
    names: list[str]
    train: ShardSplit
    val: ShardSplit
    label_digits: int
    manifest: dict

    @property
    def num_classes(self) -> int:
        return len(self.wnids)

    def summary(self) -> str:
        return (
            f"{self.root} (shards): {self.num_classes} classes, {len(self.train):,} train images in "
            f"{len(self.train.shards)} shards, {len(self.val):,} val images in {len(self.val.shards)} shards"
        )

    @classmethod
    def open(cls, root: str | os.PathLike) -> ShardSet:
        """The set at ``root``, its manifest checked and every shard's and index's size compared with it."""
        root = Path(root).expanduser()
        manifest_path = root / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ShardSetError(
                f"{manifest_path}: missing: {root} is not a finished shard set (python -m data.shards SRC {root} "
                "continues an interrupted conversion)"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ShardSetError(f"{manifest_path}: not a shard set manifest ({error})") from error
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ShardSetError(f"{manifest_path}: not a manifest of {FORMAT!r} (no 'format' key saying so)")
        if manifest.get("version") != VERSION:
            raise ShardSetError(f"{manifest_path}: format version {manifest.get('version')}, this code reads {VERSION}")
        try:
            digits = int(manifest["label_digits"])
            splits = {name: _split(root, manifest["splits"][name], digits) for name in SPLITS}
            shard_set = cls(
                root,
                list(manifest["classes"]["wnids"]),
                list(manifest["classes"]["names"]),
                splits["train"],
                splits["val"],
                digits,
                manifest,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ShardSetError(f"{manifest_path}: malformed manifest ({type(error).__name__}: {error})") from error
        for split in (shard_set.train, shard_set.val):
            if len(split.per_class) != shard_set.num_classes or sum(split.per_class) != len(split):
                raise ShardSetError(f"{manifest_path}: per-class counts do not add up to the shards' samples")
            for shard in split.shards:
                shard.check_sizes(root)
                shard.check_index(root)
        return shard_set

    def verify(self) -> None:
        """Every shard's and index's checksum, and every index against its tar: ``ShardSetError`` at the first fault."""
        for split in (self.train, self.val):
            for shard in split.shards:
                shard.verify(self.root, self.label_digits, self.num_classes)


def _split(root: Path, record: dict, label_digits: int) -> ShardSplit:
    shards = tuple(Shard(**shard) for shard in record["shards"])
    return ShardSplit(root, shards, tuple(int(n) for n in record["per_class"]), label_digits)
