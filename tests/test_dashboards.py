"""Dashboards: W&B (offline, read back with wandb's own reader) against the CSV log, throughput telemetry, progress
lines, secrets kept out, and the report's plots."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loggers.wandb_logger import resolve_mode, run_id
from report import report
from tests.conftest import PROJECT_ROOT, SMALL_RUN

DUMMY_KEY = "dummy0wandb0key0" + "5" * 24  # 40 characters, like a real W&B key
TYPED_SECRET = "typed0secret0" + "7" * 20  # a secret typed on the command line under a secret-looking key
# Where secrets reach the config: an environment variable read by an interpolation (its key looks harmless, its
# value is the W&B key) and a value typed under a secret-looking key.
SECRET_OVERRIDES = ["+storage.endpoint_note=${oc.env:WANDB_API_KEY}", f"+storage.api_token={TYPED_SECRET}"]
WANDB_DIRS = ("DATA", "CACHE", "CONFIG", "ARTIFACT")  # W&B's own folders (artifact staging): in the test's folder
PERF_KEYS = {"perf/images_per_s", "perf/images_per_s_per_device", "perf/data_wait_fraction", "perf/step_time_s"}


def wandb_records(run: Path) -> list[list[dict]]:
    """Every offline W&B run of a run folder, each as its records, read by wandb's own reader."""
    runs = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        inspect = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)]
        runs.append([json.loads(line) for line in subprocess.check_output(inspect, text=True).splitlines()])
    return runs


def csv_rows(run: Path) -> list[dict[str, float]]:
    with open(run / "csv" / "version_0" / "metrics.csv", newline="") as file:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(file)]


def assert_plots(paths: list[Path]) -> None:
    names = ["accuracy.png", "error.png", "learning_rate.png", "loss.png", "throughput.png"]
    assert sorted(p.name for p in paths) == names
    for path in paths:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] >= 300 and pixels.shape[1] >= 500
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{path} looks blank"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real 2-epoch run logging to CSV, W&B (offline) and TensorBoard, with a W&B key in its environment."""
    folder = tmp_path_factory.mktemp("dashboards")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            *SMALL_RUN,
            f"paths.cache_dir={folder / 'cache'}",
            f"hydra.run.dir={folder / 'run'}",
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=3",
            "trainer.enable_progress_bar=true",
            "optimizer.lr=0.05",
            "logger=[csv,wandb,tensorboard]",
            "logger.wandb.mode=offline",
            "callbacks.wandb_checkpoints.enabled=true",
            *SECRET_OVERRIDES,
        ],
        cwd=PROJECT_ROOT,
        env={**env, "WANDB_API_KEY": DUMMY_KEY, **{f"WANDB_{d}_DIR": str(folder / "wandb-home") for d in WANDB_DIRS}},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return folder / "run", result.stdout + result.stderr


@pytest.mark.slow
def test_offline_wandb_run_holds_the_config_and_the_csv_metrics(logged_run):
    run, _ = logged_run
    (records,) = wandb_records(run)
    config: dict = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"]["update"])
    assert (
        "optimizer.lr=0.05" in config["run"]["overrides"]
        and "logger=[csv,wandb,tensorboard]" in config["run"]["overrides"]
    )
    assert config["run"]["world_size"] == 1 and config["run"]["versions"]["torch"] == "2.14.1"
    assert set(config["run"]["git"]) == {"commit", "dirty"}
    assert config["optimizer"]["lr"] == 0.05 and config["model"]["net"]["arch"] == "resnet18"
    assert config["storage"] == {"endpoint_note": "***", "api_token": "***"}  # masked by value, and by key
    assert "+storage.api_token=***" in config["run"]["overrides"]

    artifacts = [record["artifact"] for record in records if record["type"] == "artifact"]
    assert sorted(alias for artifact in artifacts for alias in artifact["aliases"] if alias != "latest") == [
        "best",
        "last",
    ]
    final = json.loads((run / "metrics.json").read_text())
    for artifact in artifacts:  # the checkpoint files, with the run's final val metrics
        metadata = json.loads(artifact["metadata"])
        assert [entry["path"] for entry in artifact["manifest"]["contents"]] == [metadata["file"]]
        assert metadata["final_val"] == pytest.approx(final) and set(final) == {"val/loss", "val/acc1", "val/acc5"}

    history = [record["history"]["item"] for record in records if record["type"] == "history"]
    keys = set().union(*history)
    expected = {"train/loss", "train/acc1", "train/acc5", "val/loss", "val/acc1", "val/acc5", "lr-SGD", "epoch"}
    assert expected | PERF_KEYS | {"perf/epoch_time_s"} <= keys
    by_step: dict[tuple[int, str], float] = {}
    for row in csv_rows(run):
        for key, value in row.items():
            by_step[int(row["step"]), key] = value
    compared = 0
    for item in history:
        for key, value in item.items():
            if not key.startswith(("_", "trainer/")) and (item["trainer/global_step"], key) in by_step:
                assert value == pytest.approx(by_step[item["trainer/global_step"], key], rel=1e-6), key
                compared += 1
    assert compared >= 30


@pytest.mark.slow
def test_throughput_and_data_wait_are_logged(logged_run):
    run, output = logged_run
    rows = csv_rows(run)
    perf = [row for row in rows if "perf/images_per_s" in row]
    assert len(perf) == 8  # every 3 of the 12 steps of each of the 2 epochs
    for row in perf:  # a window's images over its time, and that time over its steps: 20 images per step
        assert row["perf/images_per_s"] * row["perf/step_time_s"] == pytest.approx(20)
        assert row["perf/images_per_s_per_device"] == row["perf/images_per_s"]  # one device
        assert 0 <= row["perf/data_wait_fraction"] <= 1
    per_epoch = [row for row in rows if "perf/epoch_images_per_s" in row]  # training images over training time
    assert [row["epoch"] for row in per_epoch] == [0, 1]
    assert all(row["perf/epoch_images_per_s"] > 0 for row in per_epoch)
    assert "of it waiting for data: " in output and ("compute-bound" in output or "data-bound" in output)
    assert "epoch 1 step 12/12 (100%)" in output and "img/s=" in output and "eta 0:00:00" in output
    assert list((run / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_no_secret_in_any_file_of_the_run(logged_run):
    """Neither the W&B key (in the environment, and through an interpolation in the config) nor a secret typed on
    the command line reaches a log, a logger's file or a checkpoint. Hydra's own record of the command line
    (.hydra/overrides.yaml, config.yaml) keeps what was typed: secrets belong in the environment."""
    run, output = logged_run
    assert DUMMY_KEY not in output and TYPED_SECRET not in output
    files = [path for path in run.parent.rglob("*") if path.is_file()]  # the run folder and W&B's own folders
    names = {path.name for path in files}
    assert {"train.log", "metrics.csv", "hparams.yaml", "debug-internal.log", "last.ckpt"} <= names
    assert any(name.endswith(".wandb") for name in names) and any(name.startswith("events.out") for name in names)
    assert "endpoint_note: '***'" in (run / "csv" / "version_0" / "hparams.yaml").read_text()
    leaking = [
        str(path)
        for path in files
        if any(secret.encode() in path.read_bytes() for secret in (DUMMY_KEY, TYPED_SECRET))
        and path.parent.name != ".hydra"
    ]
    assert not leaking
    assert TYPED_SECRET in (run / ".hydra" / "overrides.yaml").read_text()  # the exemption is Hydra's record only


@pytest.mark.slow
def test_report_plots_a_run(logged_run, tmp_path: Path):
    run, _ = logged_run
    assert_plots(report(run, tmp_path / "from-csv"))


@pytest.mark.slow
def test_report_reads_wandb_files_where_there_is_no_csv(logged_run, tmp_path: Path):
    run, _ = logged_run
    wandb_only = tmp_path / "run"
    wandb_only.mkdir()
    (wandb_only / "wandb").symlink_to(run / "wandb")
    assert_plots(report(wandb_only, tmp_path / "from-wandb"))


def test_wandb_mode_never_waits_for_an_unreachable_server(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.netrc
    assert resolve_mode("auto") == "offline"  # no credentials
    monkeypatch.setenv("WANDB_API_KEY", DUMMY_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled" and resolve_mode("online") == "online"
    with pytest.raises(ValueError, match="logger.wandb.mode must be one of"):
        resolve_mode("sometimes")


def test_wandb_run_id_is_fixed_by_the_run_folder(tmp_path: Path):
    assert run_id(tmp_path / "4242") == run_id(tmp_path / "4242") != run_id(tmp_path / "4243")
    assert run_id(tmp_path / "2026-11-29_03:05").startswith("2026-11-29_03-05-")


def test_rich_bar_on_a_terminal_moves_every_step(make_cfg, monkeypatch):
    """On a terminal the rich bar (callbacks/progress.py, through compat.py's access to Lightning's bar) counts
    every training step of every epoch."""
    from assemble import instantiate_all
    from callbacks.progress import SparseRichProgressBar
    from train import train

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    bars = []

    def keep_bar(group):
        objects = instantiate_all(group)
        bars.extend(o for o in objects if isinstance(o, SparseRichProgressBar))
        return objects

    monkeypatch.setattr("train.instantiate_all", keep_bar)
    train(
        make_cfg(*SMALL_RUN, "trainer.enable_progress_bar=true", "trainer.max_epochs=2", "trainer.log_every_n_steps=5")
    )
    (bar,) = bars
    train_task = next(task for task in bar.progress.tasks if task.id == bar.train_progress_bar_id)
    assert (train_task.completed, train_task.total) == (12, 12)
