"""Plots of a run or a sweep, as PNGs: loss, top-1 and top-5 per epoch, learning rate, throughput.

    python report.py outputs/train/<run id>                 # writes outputs/train/<run id>/report/*.png
    python report.py outputs/train/multirun/<date>          # a sweep: one curve per job, labelled by its overrides
    python report.py FOLDER --out DIR

Reads the CSV logs (every csv/version_N of a resumed run, later versions winning), or, where a run has none, its
W&B offline files through wandb's own reader (``wandb leet inspect --json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sweeps.summary import job_rows, varying_overrides  # noqa: E402

Series = dict[str, dict[float, float]]  # metric -> x (step or epoch) -> value


def load_run(folder: Path) -> tuple[Series, Series]:
    """The run's metrics by global step and, for epoch-level metrics, by epoch."""
    rows = _csv_rows(folder) or _wandb_rows(folder)
    if not rows:
        raise SystemExit(f"{folder}: no metrics (neither csv/version_*/metrics.csv nor wandb/*/run-*.wandb)")
    by_step: Series = {}
    by_epoch: Series = {}
    for row in rows:
        step, epoch = row.pop("step", None), row.pop("epoch", None)
        for key, value in row.items():
            if step is not None:
                by_step.setdefault(key, {})[step] = value
            if epoch is not None:
                by_epoch.setdefault(key, {})[epoch] = value
    return by_step, by_epoch


def _csv_rows(folder: Path) -> list[dict[str, float]]:
    versions = sorted(folder.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    rows = []
    for path in versions:
        with open(path, newline="") as file:
            rows += [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(file)]
    return rows


def _wandb_rows(folder: Path) -> list[dict[str, float]]:
    rows = []
    for path in sorted(folder.glob("wandb/*/run-*.wandb")):
        records = subprocess.run(
            [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        for record in map(json.loads, records):
            if record["type"] == "history":
                item = record["history"]["item"]
                row = {k: v for k, v in item.items() if not k.startswith("_") and isinstance(v, (int, float))}
                if "trainer/global_step" in row:
                    row["step"] = row.pop("trainer/global_step")
                rows.append(row)
    return rows


def plot(runs: dict[str, tuple[Series, Series]], out: Path, title: str) -> list[Path]:
    """One PNG per figure; one curve per run (label = the run's name or its overrides)."""
    out.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss": [("train/loss", "step", "train loss"), ("val/loss", "epoch", "val loss")],
        "accuracy": [
            ("val/acc1", "epoch", "val top-1"),
            ("val/acc5", "epoch", "val top-5"),
            ("train/acc1", "epoch", "train top-1"),
        ],
        "learning_rate": [("lr-*", "step", "learning rate")],
        "throughput": [
            ("perf/images_per_s", "step", "images/s (all devices)"),
            ("perf/data_wait_fraction", "step", "fraction of step time waiting for data"),
        ],
    }
    written = []
    for name, panels in figures.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (key, x, label) in zip(axes[0], panels):
            for run_label, (by_step, by_epoch) in runs.items():
                source = by_step if x == "step" else by_epoch
                keys = [k for k in source if k.startswith(key[:-1])] if key.endswith("*") else [key]
                for metric in keys:
                    points = sorted(source.get(metric, {}).items())
                    if points:
                        ax.plot(*zip(*points), marker="o" if x == "epoch" else None, markersize=3, label=run_label)
            ax.set(title=label, xlabel=x, ylabel=label)
            ax.grid(alpha=0.3)
            if ax.has_data() and len(runs) > 1:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def report(folder: Path, out: Path | None = None) -> list[Path]:
    """Plots for a run folder, or for a sweep folder (numbered job folders)."""
    jobs = [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    if jobs:
        rows = job_rows(folder)
        labels = [f"{row['job']}: {varying or 'job'}" for row, varying in zip(rows, varying_overrides(rows))]
        runs = {label: load_run(Path(row["folder"])) for label, row in zip(labels, rows)}
    else:
        runs = {folder.name: load_run(folder)}
    return plot(runs, out or folder / "report", title=str(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a run folder or a sweep folder")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: FOLDER/report)")
    args = parser.parse_args()
    if not args.folder.is_dir():
        parser.error(f"{args.folder}: not a folder")
    for path in report(args.folder, args.out):
        print(path)


if __name__ == "__main__":
    main()
