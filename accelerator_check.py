"""A run that asked for GPUs stops before anything is built when CUDA is not usable, instead of training on the CPU.

Why: with ``accelerator: auto`` Lightning quietly picks the CPU when CUDA reports no device, and the usual cause on
a cluster is a node whose NVIDIA driver is older than the installed wheels' CUDA: an 8-GPU job would then train as
8 CPU processes over gloo. The message names the driver found, what the wheels need and how to get a matching build.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

# The oldest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility; NVIDIA's CUDA
# toolkit release notes, table 3).
MINIMUM_DRIVER = {13: "580.65.06", 12: "525.60.13", 11: "450.80.02"}
NO_DEVICES = {"", "-1", "none", "NoDevFiles"}  # CUDA_VISIBLE_DEVICES values that hide every GPU


class GpuUnavailableError(RuntimeError):
    """GPUs were asked for and CUDA cannot use any."""


@dataclass(frozen=True)
class CudaFacts:
    """What this machine says about CUDA: ``driver`` the NVIDIA driver's version, ``driver_cuda`` the newest CUDA it
    runs, ``wheels`` the installed CUDA builds (name -> CUDA version), ``torch_says`` torch's own reason."""

    usable: bool
    driver: str | None
    driver_cuda: str | None
    wheels: dict[str, str]
    torch_says: str


def gpu_requests(cfg: DictConfig, environ: os._Environ | dict = os.environ) -> list[str]:
    """Why this run expects a GPU (empty: it does not). An explicit ``trainer.accelerator=cpu`` wins over the job's
    GPUs and over a GPU preset; a DALI loader told to decode on the GPU always asks for one."""
    requests = []
    if cfg.data.get("loader", {}).get("device") == "mixed":
        requests.append("data.loader.device=mixed")
    accelerator = cfg.trainer.get("accelerator", "auto")
    if accelerator in ("gpu", "cuda"):
        requests.append(f"trainer.accelerator={accelerator}")
    elif accelerator == "auto":
        gpus_on_node = environ.get("SLURM_GPUS_ON_NODE", "0")
        if gpus_on_node.isdigit() and int(gpus_on_node) > 0:
            requests.append(f"the SLURM job has GPUs (SLURM_GPUS_ON_NODE={gpus_on_node})")
        elif environ.get("SLURM_JOB_GPUS"):
            requests.append(f"the SLURM job has GPUs (SLURM_JOB_GPUS={environ['SLURM_JOB_GPUS']})")
        elif environ.get("CUDA_VISIBLE_DEVICES", "").strip() not in NO_DEVICES:
            requests.append(f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']} names GPUs")
    return requests


def cuda_facts() -> CudaFacts:
    """Whether torch can use a GPU, and what the driver and the installed wheels say."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available() and torch.cuda.device_count() > 0
    said = " ".join(str(w.message) for w in caught if "CUDA" in str(w.message))
    torch_says = re.split(r" Please | \(Triggered", said)[0] or "no CUDA device found"  # the reason, not the ads
    return CudaFacts(usable, _driver_version(), _driver_cuda_version(), _cuda_wheels(), torch_says)


def require_cuda_where_asked(cfg: DictConfig) -> None:
    """Raises ``GpuUnavailableError`` (with the fix) when the run asked for GPUs and CUDA is not usable."""
    requests = gpu_requests(cfg)
    if requests:
        facts = cuda_facts()
        if not facts.usable:
            raise GpuUnavailableError(explain(requests, facts))


def explain(requests: list[str], facts: CudaFacts) -> str:
    """The message: what asked for a GPU, the driver found, what the wheels need, how to match them."""
    wheels = ", ".join(f"{name} (CUDA {cuda})" for name, cuda in facts.wheels.items()) or "no CUDA build of torch"
    needed = max((_major(cuda) for cuda in facts.wheels.values()), default=None)
    minimum = MINIMUM_DRIVER.get(needed) if needed else None
    if facts.driver is None and facts.driver_cuda is None:
        driver = "no NVIDIA driver found (no /proc/driver/nvidia/version, no nvidia-smi, no libcuda.so.1)"
    else:
        runs = f", which runs CUDA up to {facts.driver_cuda}" if facts.driver_cuda else ""
        driver = f"NVIDIA driver {facts.driver or 'of unknown version'}{runs}"
    lines = [
        f"This run asked for a GPU ({'; '.join(requests)}), but CUDA is not usable here: {facts.torch_says}",
        f"  found: {driver}",
        f"  installed: {wheels}" + (f"; these need driver >= {minimum}" if minimum else ""),
    ]
    if facts.driver_cuda and needed and _major(facts.driver_cuda) < needed:
        builds = _major(facts.driver_cuda)
        lines.append(
            f"  fix: update the node's driver to >= {minimum}, or install builds for CUDA {builds}: "
            f"pip install torch=={_base(torch.__version__)} torchvision=={_base(_version('torchvision'))} "
            f"--index-url https://download.pytorch.org/whl/cu{builds}X "
            f"(X: a minor version your driver runs, see https://pytorch.org/get-started/locally/) and "
            f"nvidia-dali-cuda{builds}0 in place of the CUDA {needed} ones"
        )
    elif facts.driver is None and facts.driver_cuda is None:
        lines.append("  fix: run on a GPU node (check the job's --gres/--gpus), or install the NVIDIA driver")
    else:
        lines.append("  fix: check nvidia-smi on this node and the job's CUDA_VISIBLE_DEVICES")
    lines.append("  or train on the CPU on purpose: trainer.accelerator=cpu (and no data.loader.device=mixed)")
    return "\n".join(lines)


def _driver_version() -> str | None:
    proc = Path("/proc/driver/nvidia/version")
    if proc.exists():
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", proc.read_text())
        if found:
            return found.group(1)
    if shutil.which("nvidia-smi"):
        try:
            output = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.split()
        except subprocess.TimeoutExpired:
            return None
        return output[0] if output else None
    return None


def _driver_cuda_version() -> str | None:
    """The newest CUDA the installed driver runs, from libcuda itself (``cuDriverGetVersion`` needs no GPU)."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def _cuda_wheels() -> dict[str, str]:
    """The installed packages built for one CUDA version: torch (``torch.version.cuda``) and DALI's
    ``nvidia-dali-cudaXY0`` wheel."""
    wheels = {f"torch {torch.__version__}": torch.version.cuda} if torch.version.cuda else {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower().replace("_", "-")
        built_for = re.fullmatch(r"nvidia-dali-cuda(\d+)\d", name)  # cuda130: CUDA 13.x
        if built_for:
            wheels[f"{name} {distribution.version}"] = f"{built_for.group(1)}.0"
    return wheels


def _major(cuda: str) -> int:
    return int(cuda.split(".")[0])


def _base(version: str) -> str:
    return version.split("+")[0]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"
