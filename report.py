"""Plots of a run or a sweep, as PNGs: loss, top-1 and top-5 accuracy and error per epoch, learning rate,
throughput per step and per epoch.

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
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

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


class Panel(NamedTuple):
    """One plot of a figure: a metric (or, ending in ``*``, every metric with that prefix) against step or epoch."""

    key: str
    x: str  # "step" or "epoch"
    label: str
    value: Callable[[float], float] | None = None  # what is drawn of each logged value; None: the value itself


def error(accuracy: float) -> float:
    return 1.0 - accuracy


FIGURES = {
    "loss": [Panel("train/loss", "step", "train loss"), Panel("val/loss", "epoch", "val loss")],
    "accuracy": [
        Panel("val/acc1", "epoch", "val top-1"),
        Panel("val/acc5", "epoch", "val top-5"),
        Panel("train/acc1", "epoch", "train top-1"),
    ],
    # the error rates the ImageNet papers compare (AlexNet, VGG and ResNet report top-1 and top-5 error)
    "error": [
        Panel("val/acc1", "epoch", "val top-1 error", error),
        Panel("val/acc5", "epoch", "val top-5 error", error),
    ],
    "learning_rate": [Panel("lr-*", "step", "learning rate")],
    "throughput": [
        Panel("perf/images_per_s", "step", "images/s (all devices)"),
        Panel("perf/data_wait_fraction", "step", "fraction of step time waiting for data"),
        # one rate per epoch, validation left out: runs of different step counts compare epoch by epoch
        Panel("perf/epoch_images_per_s", "epoch", "training images/s per epoch (all devices)"),
    ],
}


def draw(runs: dict[str, tuple[Series, Series]], title: str) -> dict[str, Figure]:
    """The figures of ``FIGURES`` by name; in each plot one curve per run, labelled with the run's key."""
    figures = {}
    for name, panels in FIGURES.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            for run_label, (by_step, by_epoch) in runs.items():
                source = by_step if panel.x == "step" else by_epoch
                keys = [k for k in source if k.startswith(panel.key[:-1])] if panel.key.endswith("*") else [panel.key]
                for metric in keys:
                    points = sorted(source.get(metric, {}).items())
                    if panel.value:
                        points = [(x, panel.value(y)) for x, y in points]
                    if points:
                        marker = "o" if panel.x == "epoch" else None
                        ax.plot(*zip(*points), marker=marker, markersize=3, label=run_label)
            ax.set(title=panel.label, xlabel=panel.x, ylabel=panel.label)
            ax.grid(alpha=0.3)
            if ax.has_data() and len(runs) > 1:
                ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        figures[name] = fig
    return figures


def plot(runs: dict[str, tuple[Series, Series]], out: Path, title: str) -> list[Path]:
    """One PNG per figure of ``draw``; one curve per run (label = the run's name or its overrides)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in draw(runs, title).items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def load_runs(folder: Path) -> dict[str, tuple[Series, Series]]:
    """A run folder's metrics under its name, or a sweep folder's (numbered job folders) per job, each labelled with
    its number and the overrides that tell it from the other jobs (``model=alexnet`` in a sweep over models)."""
    jobs = [p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]
    if not jobs:
        return {folder.name: load_run(folder)}
    rows = job_rows(folder)
    labels = [f"{row['job']}: {varying or 'job'}" for row, varying in zip(rows, varying_overrides(rows))]
    return {label: load_run(Path(row["folder"])) for label, row in zip(labels, rows)}


def report(folder: Path, out: Path | None = None) -> list[Path]:
    """Plots for a run folder, or for a sweep folder (numbered job folders)."""
    return plot(load_runs(folder), out or folder / "report", title=str(folder))


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
