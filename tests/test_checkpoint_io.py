"""A checkpoint write that dies half-way leaves the previous checkpoint intact and no debris."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from plugins.checkpoint_io import AtomicCheckpointIO
from tests.conftest import PROJECT_ROOT, SMALL_RUN
from train import train


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


@pytest.fixture
def run_on_a_small_disk(tmp_path: Path):
    """The run folder that ``make_cfg`` uses, on a file system of its own that holds one checkpoint of the small
    run (ResNet-18 with its momentum: ~90 MB) and not two; the system's temp folder stays elsewhere."""
    run = tmp_path / "run"
    run.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(run)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"mounting a small tmpfs needs root: {mounted.stderr.decode().strip()}")
    yield run
    subprocess.run(["umount", "--lazy", str(run)], check=True)


def test_a_disk_full_during_a_training_checkpoint_leaves_no_partial_file(make_cfg, run_on_a_small_disk: Path):
    """The trainer writes its checkpoints through AtomicCheckpointIO: the epoch's top-k file fits, its last.ckpt
    does not. The run stops naming the checkpoint, and no partial file is left for a resume to choke on (Lightning's
    own writer copies from the temp folder over the target, leaving it half-written)."""
    cfg = make_cfg(*SMALL_RUN, "trainer.max_epochs=1", "+trainer.num_sanity_val_steps=0")
    with pytest.raises(OSError) as raised:
        train(cfg)
    files = sorted(p.relative_to(run_on_a_small_disk) for p in run_on_a_small_disk.rglob("*.ckpt*"))
    assert len(files) == 1 and files[0].name.startswith("epoch000-top1_"), files  # no last.ckpt, whole or partial
    assert torch.load(run_on_a_small_disk / files[0], weights_only=True)["global_step"] == 12
    assert f"cannot write checkpoint {run_on_a_small_disk}/checkpoints/last.ckpt (No space left" in str(raised.value)


SLURM_TASK = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "imagenet"}
SLURM_TASK |= {"SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


@pytest.mark.parametrize("preset", sorted(p.stem for p in (PROJECT_ROOT / "conf" / "trainer").glob("*.yaml")))
def test_every_trainer_preset_writes_checkpoints_atomically(make_cfg, monkeypatch, preset: str):
    for name, value in SLURM_TASK.items() if preset == "slurm" else ():
        monkeypatch.setenv(name, value)  # trainer=slurm is built inside a job
    cfg = make_cfg(f"trainer={preset}", "trainer.accelerator=cpu", "trainer.devices=1")
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
