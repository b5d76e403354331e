"""What a run records about itself in its loggers, with secrets masked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

SECRET_NAME = re.compile(r"api[_-]?key|token|secret|passw|credential", re.IGNORECASE)
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "torchmetrics", "hydra-core", "nvidia-dali-cuda130", "wandb")
MASK = "***"


def run_config(cfg: DictConfig, world_size: int) -> dict[str, Any]:
    """The resolved config plus ``run``: the command-line overrides, the code's git commit and dirty state, the
    library versions and the world size. Keys that look like secrets (in the config and in the overrides), and the
    values of secret-looking environment variables (WANDB_API_KEY, tokens) wherever they appear, are masked."""
    config = OmegaConf.to_container(cfg, resolve=True)
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    config["run"] = {
        "overrides": masked_command_line(overrides),
        "git": _git_state(Path(__file__).resolve().parents[1]),
        "versions": {"python": sys.version.split()[0], **{name: _version(name) for name in PACKAGES}},
        "world_size": world_size,
    }
    return _masked(config, _secret_values())


def masked_command_line(args: Sequence[str]) -> list[str]:
    """Command-line arguments with the values of secret-looking keys (``+storage.api_key=VALUE``) and of secret
    environment variables masked: what loggers may record of a command line."""
    return _masked([_masked_override(arg) for arg in args], _secret_values())


def _secret_values() -> list[str]:
    return [value for name, value in os.environ.items() if SECRET_NAME.search(name) and len(value) >= 8]


def _masked(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: MASK if SECRET_NAME.search(str(k)) else _masked(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
    return value


def _masked_override(override: str) -> str:
    key, assigns, _ = override.partition("=")
    return f"{key}={MASK}" if assigns and SECRET_NAME.search(key) else override


def _git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
