"""A run that asked for a GPU stops at once, with the fix, where CUDA is not usable; a CPU run nobody asked a GPU for
trains as before."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from accelerator_check import gpu_requests
from tests.conftest import SMALL_RUN, run_train

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the machine without a usable GPU")

FAST = [*SMALL_RUN, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1"]


@pytest.mark.parametrize(
    ("overrides", "environ", "expected"),
    [
        (["experiment=resnet50"], {}, ["trainer.accelerator=gpu"]),
        (["experiment=resnet50", "trainer=ddp"], {}, ["trainer.accelerator=gpu"]),
        (["experiment=vgg16", "trainer=slurm"], {}, ["trainer.accelerator=gpu"]),
        (["experiment=resnet50", "trainer.accelerator=cpu"], {"SLURM_JOB_GPUS": "0,1"}, []),  # cpu on purpose wins
        (["trainer=ddp"], {}, []),  # auto, and nothing asked for a GPU: the CPU machine's run
        (["trainer=ddp"], {"CUDA_VISIBLE_DEVICES": "0"}, ["CUDA_VISIBLE_DEVICES=0 names GPUs"]),
        (["trainer=ddp"], {"CUDA_VISIBLE_DEVICES": ""}, []),
        (["trainer=slurm"], {"SLURM_GPUS_ON_NODE": "8"}, ["the SLURM job has GPUs (SLURM_GPUS_ON_NODE=8)"]),
        (["trainer=slurm"], {"SLURM_JOB_GPUS": "2,3"}, ["the SLURM job has GPUs (SLURM_JOB_GPUS=2,3)"]),
        (["data/loader=dali", "data.loader.device=mixed"], {}, ["data.loader.device=mixed"]),
    ],
)
def test_what_asks_for_a_gpu(make_cfg, overrides, environ, expected):
    assert gpu_requests(make_cfg(*overrides, "data.root=x"), environ) == expected


@pytest.mark.parametrize(
    ("overrides", "environ", "asked"),
    [
        (["trainer=gpu"], {}, "trainer.accelerator=gpu"),
        (["trainer=ddp", "trainer.devices=8"], {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, "CUDA_VISIBLE_DEVICES"),
        (["data/loader=dali", "data.loader.device=mixed"], {}, "data.loader.device=mixed"),
    ],
)
def test_a_run_that_asked_for_a_gpu_stops_before_building_anything(tmp_path: Path, overrides, environ, asked):
    """Without a driver: the message says so, names what asked, what the wheels need; no index, no run files."""
    cache = tmp_path / "cache"
    result = run_train(*FAST, *overrides, cache_dir=cache, run_dir=tmp_path / "run", env=environ, timeout=120)
    assert result.returncode != 0
    assert f"This run asked for a GPU ({asked}" in result.stderr, result.stderr[-3000:]
    assert "no NVIDIA driver found" in result.stderr
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda})" in result.stderr
    assert "trainer.accelerator=cpu" in result.stderr  # the way to run on the CPU on purpose
    assert not cache.exists() and not list((tmp_path / "run").glob("**/*.ckpt"))
    assert "Dataset " not in result.stdout + result.stderr  # the index did not run
    assert "GpuUnavailableError: This run asked" in result.stderr  # raised by the check, not by a library


def test_cpu_on_purpose_trains_in_a_job_that_has_gpus(tmp_path: Path):
    result = run_train(
        *FAST,
        "trainer=ddp",
        "trainer.devices=1",
        "trainer.accelerator=cpu",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
        env={"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final validation metrics: {'val/" in result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the stand-in driver library")
def test_a_driver_older_than_the_wheels_is_named_with_the_matching_builds(tmp_path: Path):
    """A stand-in ``libcuda.so.1`` that reports CUDA 12.2 (driver 535's) and an ``nvidia-smi`` that reports 535: torch
    itself finds the driver too old, and the message names the driver, what the wheels need and the CUDA 12 builds."""
    fake = tmp_path / "driver"
    fake.mkdir()
    source = fake / "libcuda.c"
    source.write_text(
        "int cuDriverGetVersion(int *version) { *version = 12020; return 0; }\n"
        "int cuInit(unsigned int flags) { return 35; }  /* CUDA_ERROR_INSUFFICIENT_DRIVER */\n"
    )
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", fake / "libcuda.so.1", source], check=True)
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 535.104.05\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = {"LD_LIBRARY_PATH": str(fake), "PATH": f"{fake}:{os.environ['PATH']}"}
    result = run_train(
        *FAST, "trainer=gpu", cache_dir=tmp_path / "cache", run_dir=tmp_path / "run", env=env, timeout=120
    )
    assert result.returncode != 0
    assert "The NVIDIA driver on your system is too old (found version 12020)" in result.stderr, result.stderr[-3000:]
    assert "found: NVIDIA driver 535.104.05, which runs CUDA up to 12.2" in result.stderr
    assert "these need driver >= 580.65.06" in result.stderr
    assert "nvidia-dali-cuda120" in result.stderr and "download.pytorch.org/whl/cu12" in result.stderr
