"""A checkpoint write that dies half-way leaves the previous checkpoint intact and no debris."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from callbacks.checkpoint_io import AtomicCheckpointIO


class _FailsWhilePickled:
    def __reduce__(self):
        raise KeyboardInterrupt("interrupted in the middle of torch.save")


def test_interrupted_write_keeps_the_good_checkpoint(tmp_path: Path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.arange(1000)}, "global_step": 7}, path)
    good = path.read_bytes()
    big = {"state_dict": {"w": torch.zeros(1_000_000)}, "poison": _FailsWhilePickled()}  # dies after bytes went out
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint(big, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(path)["global_step"] == 7


def test_write_replaces_and_creates_folders(tmp_path: Path):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "epoch=1.ckpt"
    for step in (1, 2):
        io.save_checkpoint({"global_step": step}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
