"""The W&B logger: online where there are credentials and a reachable server, offline otherwise, never blocking a
run; one W&B run per run folder, so a requeued SLURM job (same folder) continues its run."""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from pytorch_lightning.loggers import WandbLogger

from loggers.run_metadata import masked_command_line

log = logging.getLogger(__name__)
MODES = ("auto", "online", "offline", "disabled")


def wandb_logger(
    project: str,
    save_dir: str,
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    notes: str | None = None,
    mode: str = "auto",
) -> WandbLogger:
    """Lightning's WandbLogger with the run id, name, group and mode this project wants.

    ``mode=auto`` follows ``WANDB_MODE`` when set, else goes online only with credentials (``WANDB_API_KEY`` or a
    netrc entry) and a server that answers within 3 s. A multirun's jobs share one group, the sweep folder's name.
    """
    mode = resolve_mode(mode)
    folder = Path(save_dir).resolve()
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        sweep = Path(HydraConfig.get().sweep.dir).name
        group = group or sweep
        name = name or f"{sweep}/{folder.name}"
    folder.mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project,
        entity=entity,
        name=name or folder.name,
        group=group,
        tags=list(tags),
        notes=notes,
        save_dir=str(folder),
        id=run_id(folder),
        offline=mode == "offline",
        mode="disabled" if mode == "disabled" else None,
    )
    with _command_line_masked():  # W&B records sys.argv when its run starts (rank zero; other ranks get a dummy)
        _ = logger.experiment
    return logger


@contextmanager
def _command_line_masked() -> Iterator[None]:
    """``sys.argv`` with secrets masked, for a while: Lightning's DDP launcher re-runs the real one for each rank."""
    argv = list(sys.argv)
    sys.argv[1:] = masked_command_line(argv[1:])
    try:
        yield
    finally:
        sys.argv[:] = argv


def run_id(folder: Path) -> str:
    """Stable per run folder: ``<folder name>-<8 hex of its path>`` (W&B ids allow letters, digits, - and _)."""
    digest = hashlib.sha1(str(folder).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', folder.name)[:50]}-{digest}"


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode must be one of {MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has(host)):
        log.info("W&B: no credentials (WANDB_API_KEY or ~/.netrc): logging offline")
        return "offline"
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as error:
        log.warning("W&B: %s:%d unreachable (%s): logging offline; `wandb sync` the run later", host, port, error)
        return "offline"
    return "online"


def finish(trainer: pl.Trainer) -> None:
    """Ends this process's W&B run with its data written: at the end of a run (the next job of a multirun in the
    same process then starts its own), and before a preempted job exits."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish()


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
