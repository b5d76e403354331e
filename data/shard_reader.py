"""A shard set's samples read by index, for the torchvision loader and ``predict.py``: sample ``i`` of a split is the
``i``-th of ``ShardSplit.samples()``, two ``os.pread`` calls at the offsets its index file gives (image, class).

Map-style, so the loader keeps its samplers (a global permutation per epoch, exact mid-epoch resume, every val image
once across ranks, ten crops): a shard split gives the batches of a folder split of its files in its order. Not the
``webdataset`` package: its IterableDataset streams whole shards, which gives no exact resume without re-reading
and partitions ranks by shards rather than by samples.

A process opens each tar once, on its first sample from it, and keeps it open (a forked DataLoader worker opens its
own: descriptors are never shared across a fork).

The samples are numpy columns (``IndexTable``), not Python objects that forked workers' reference counting copies
(pytorch/pytorch#13246). 1M synthetic samples: 68 MiB of arrays, built in 3.2 s, none copied by a worker reading them
all; as (tar, IndexedSample) tuples they were +655 MiB of RSS, built in 14.6 s, 387 MiB copied by each such worker.
"""

from __future__ import annotations

import logging
import os
import resource
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from data.shard_set import IndexedSample, IndexTable, ShardSplit, parse_label, read_index_table, read_member
from data.spec import ImageSpec
from data.torchvision_backend import ImageFiles, TrainTransforms, decode_bytes

log = logging.getLogger(__name__)

RESERVED_DESCRIPTORS = 256  # left to the rest of a process: pipes, sockets, tensors shared between processes


def descriptor_budget(tars: int) -> int:
    """How many of ``tars`` a process may keep open: the soft RLIMIT_NOFILE is raised towards the hard one to make
    room for them all; where the hard limit is too low, fewer (a warning says so)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = tars + RESERVED_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    budget = tars if soft == resource.RLIM_INFINITY else max(1, min(tars, soft - RESERVED_DESCRIPTORS))
    if budget < tars:
        log.warning(
            "%d tar shards, but the open-file limit (ulimit -n: %d, hard %d) leaves room for %d: each process keeps "
            "the %d it used last open and reopens the others (raise the hard limit to read each shard once)",
            tars,
            soft,
            hard,
            budget,
            budget,
        )
    return budget


def concatenate(tables: Sequence[IndexTable]) -> IndexTable:
    """The samples of ``tables`` end to end, as one table."""
    ends = np.cumsum([0] + [len(table.keys) for table in tables])
    starts = [table.key_starts[:-1] + end for table, end in zip(tables, ends)]
    columns = {
        name: np.concatenate([np.empty(0, dtype), *(getattr(table, name) for table in tables)])
        for name, dtype in (
            ("image_ext", np.uint8),
            ("image_offset", np.int64),
            ("image_size", np.int64),
            ("label_offset", np.int64),
            ("label_size", np.int64),
        )
    }
    key_starts = np.concatenate([*starts, np.array([ends[-1]], dtype=np.int64)])
    return IndexTable(b"".join(table.keys for table in tables), key_starts, **columns)


class ShardReader:
    """Samples of tar shards by index: their names, decoded images and classes, read through descriptors that the
    process keeps open (at most ``descriptor_budget``, the least recently used closed beyond it).

    The samples are one ``IndexTable`` of the shards' index files end to end and a shard number each (numpy arrays:
    no Python object per sample for forked workers' reference counting to copy), the tars' paths one per shard."""

    def __init__(self, tars: Sequence[str], tables: Sequence[IndexTable]) -> None:
        """The samples of ``tables[i]`` lie in tar ``tars[i]``."""
        if len(tars) != len(tables):
            raise ValueError(f"{len(tars)} tars, {len(tables)} index tables")
        self._descriptors: OrderedDict[str, int] = OrderedDict()
        self._pid = os.getpid()
        self.tars, self.budget = [str(tar) for tar in tars], descriptor_budget(len(tars))
        self.table = concatenate(tables)
        counts = [len(table) for table in tables]
        self.shards = np.repeat(np.arange(len(tables), dtype=np.int32), counts)  # each sample's tar in ``tars``

    @classmethod
    def of_split(cls, split: ShardSplit) -> ShardReader:
        tables = [read_index_table(split.root / shard.index, shard.bytes) for shard in split.shards]
        return cls(split.tar_paths, tables)

    @classmethod
    def of_tar(cls, tar: str | os.PathLike) -> ShardReader:
        """One shard on its own, its DALI index beside it (``<name>.idx``)."""
        tar = Path(tar)
        return cls([str(tar)], [read_index_table(tar.with_suffix(".idx"), tar.stat().st_size)])

    def __len__(self) -> int:
        return len(self.table)

    def sample(self, index: int) -> tuple[str, IndexedSample]:
        """Sample ``index``'s tar and its place there, as ``ShardSplit.samples()`` lists it."""
        sample = self.table.sample(index)  # checks the index first
        return self.tars[self.shards[index]], sample

    def name(self, index: int) -> str:
        """``<tar>:<key>``, as ``ShardSplit.paths`` names samples."""
        tar, sample = self.sample(index)
        return f"{tar}:{sample.key}"

    def image(self, index: int, spec: ImageSpec) -> torch.Tensor:
        """Sample ``index``'s image as ``decode`` makes a file's; a sample that cannot be decoded is an error naming its
        tar and key, as are those ``read_member`` finds."""
        tar, sample = self.sample(index)
        encoded = read_member(self._descriptor(tar), tar, sample.image_name, sample.image)
        try:
            data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)  # a writable copy: bytes draw a warning
            return decode_bytes(data, spec)
        except (RuntimeError, ValueError) as error:  # frombuffer refuses an empty member with a ValueError
            raise RuntimeError(f"{tar}: sample {sample.key!r}: cannot be decoded ({error})") from error

    def label(self, index: int, digits: int, num_classes: int) -> int:
        """Sample ``index``'s class from its ``.cls`` member (``parse_label``: never a silently wrong one)."""
        tar, sample = self.sample(index)
        text = read_member(self._descriptor(tar), tar, sample.label_name, sample.label)
        return parse_label(text, digits, num_classes, tar, sample.key)

    def _descriptor(self, tar: str) -> int:
        if self._pid != os.getpid():  # forked: what the parent had open are this process's copies, not its own
            self.close()
            self._pid = os.getpid()
        descriptor = self._descriptors.get(tar)
        if descriptor is None:
            if len(self._descriptors) >= self.budget:
                os.close(self._descriptors.popitem(last=False)[1])
            descriptor = self._descriptors[tar] = os.open(tar, os.O_RDONLY | os.O_CLOEXEC)
        else:
            self._descriptors.move_to_end(tar)
        return descriptor

    def close(self) -> None:
        """Closes the tars this process holds open (they reopen on the next read)."""
        while self._descriptors:
            os.close(self._descriptors.popitem()[1])

    __del__ = close

    def __getstate__(self) -> dict:
        """Pickled (a spawned worker) without descriptors: they are this process's."""
        return {**self.__dict__, "_descriptors": OrderedDict()}


class ShardImages(ImageFiles):
    """``ImageFiles`` over a shard set's split: the same keys, images, labels and seeded augmentations, read from its
    tars."""

    def __init__(self, split: ShardSplit, spec: ImageSpec, transform: v2.Transform | TrainTransforms) -> None:
        super().__init__(split, spec, transform)
        self.reader = ShardReader.of_split(split)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        label = self.reader.label(index, self.split.label_digits, self.split.num_classes)
        return self.reader.image(index, self.spec), label
