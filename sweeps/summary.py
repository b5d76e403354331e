"""Hydra sweeps: a summary of every job (overrides, state, final val top-1/top-5), and the launch check for them.

    python -m sweeps.summary outputs/train/multirun/<date>   # print (and rewrite) a sweep's summary at any time

Each job records itself when it ends (``job.json`` in its folder, rank zero only) and rewrites the sweep's
``summary.csv``, so the summary is current even while other jobs still run or after the launcher was killed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from compat import job_error, launches_its_ranks_by_rerunning_the_script
from slurm.environment import slurm_job_id

JOB_RECORD = "job.json"
METRICS = "metrics.json"
SUMMARY = "summary.csv"
COLUMNS = ("job", "state", "restarts", "val/acc1", "val/acc5", "overrides", "slurm_job_id", "folder")


class SweepSummary(Callback):
    """Hydra callback: each job of a multirun records how it ended; the sweep's summary follows."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN or rank_zero_only.rank != 0:
            return
        folder = Path(config.hydra.runtime.output_dir)
        record = {
            "job": int(config.hydra.job.num),
            "state": "done" if job_return.status == JobStatus.COMPLETED else "failed",
            "restarts": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
            "overrides": list(job_return.overrides or []),
            "slurm_job_id": slurm_job_id() or "",
        }
        if job_return.status == JobStatus.FAILED:
            error = job_error(job_return)
            record["error"] = f"{type(error).__name__}: {error}"
        _write_atomically(folder / JOB_RECORD, json.dumps(record, indent=1))
        write_summary(folder.parent)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        print(format_summary(write_summary(Path(config.hydra.sweep.dir))))


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder: ``done``/``failed`` as the job recorded it, ``requeued`` for a job interrupted with a
    checkpoint to resume from (SLURM restarts it), ``running`` for a job that has started and not ended."""
    rows = []
    for folder in sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
        record_path = folder / JOB_RECORD
        if record_path.exists():
            row = json.loads(record_path.read_text())
        else:
            overrides = folder / ".hydra" / "overrides.yaml"
            row = {
                "job": int(folder.name),
                "state": "requeued" if any(folder.glob("hpc_ckpt_*.ckpt")) else "running",
                "overrides": list(OmegaConf.load(overrides)) if overrides.exists() else [],
            }
        metrics_path = folder / METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        rows.append(
            {
                **{column: row.get(column, "") for column in COLUMNS},
                "val/acc1": metrics.get("val/acc1", ""),
                "val/acc5": metrics.get("val/acc5", ""),
                "overrides": " ".join(row.get("overrides", [])),
                "folder": str(folder),
            }
        )
    return rows


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Rewrite ``<sweep_dir>/summary.csv`` from the job folders; returns its rows."""
    rows = job_rows(sweep_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    _write_atomically(sweep_dir / SUMMARY, text.getvalue())
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as an aligned text table; its overrides column shows only what differs between the jobs."""
    shown = [("job", "state", "restarts", "top-1", "top-5", "overrides")]
    for row, varying in zip(rows, varying_overrides(rows)):
        top1, top5 = (f"{row[key]:.4f}" if row[key] != "" else "-" for key in ("val/acc1", "val/acc5"))
        shown.append((str(row["job"]), row["state"], str(row["restarts"]), top1, top5, varying))
    widths = [max(len(line[i]) for line in shown) for i in range(len(shown[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]) for line in shown)


def varying_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Each job's overrides without those every job of the sweep shares: what tells the jobs apart."""
    overrides = [row["overrides"].split() for row in rows]
    shared = set.intersection(*map(set, overrides)) if len(rows) > 1 else set()
    return [" ".join(o for o in job if o not in shared) for job in overrides]


def refuse_subprocess_ddp_in_multirun(trainer: pl.Trainer) -> None:
    """Lightning's DDP launcher starts its other ranks by running ``sys.argv`` again, which inside a Hydra multirun
    is the whole sweep (Lightning #11300, #15737): refuse it with the two ways that work."""
    if (
        HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
        and launches_its_ranks_by_rerunning_the_script(trainer)
    ):
        raise RuntimeError(
            "A Hydra multirun (-m) cannot start DDP processes itself (trainer.strategy=ddp with "
            f"{trainer.num_devices} devices): sweep on SLURM with hydra/launcher=slurm trainer=slurm (srun starts the "
            "processes), or run the sweep's jobs with trainer.strategy=ddp_spawn, or with trainer.devices=1."
        )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m sweeps.summary SWEEP_DIR  (the multirun folder with one folder per job)")
    print(format_summary(write_summary(Path(sys.argv[1]))))
