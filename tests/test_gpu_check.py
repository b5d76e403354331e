"""scripts/gpu_check.sh in its dry mode: every step of the GPU check, on the CPU at toy sizes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "gpu_check.sh"
PIPELINES = [
    "decode ceiling",
    "torchvision classic",
    "plain decode_jpeg + transforms.v2 on uint8",
    "torchvision fast path",
    "DALI CPU",
]
MODELS = {"resnet50": 4, "resnet18": 8, "vgg16": 2, "alexnet": 8}  # the dry mode's batches


@pytest.mark.slow
def test_dry_run_benchmarks_every_model_with_the_gpu_fast_path(tmp_path: Path):
    out = tmp_path / "gpu-check"
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--dry"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for model, batch in MODELS.items():
        report = json.loads((out / model / "bench.json").read_text())
        config = report["config"]
        assert (config["model"], config["batch"], config["data_loader"]) == (model, batch, "DaliLoaders")
        assert config["channels_last"] is True and config["optimizer_fused"] is True
        assert list(report["results"]) == ["data", "synthetic", "trainer", "loop"]
        assert all(r["images_per_s"] > 0 and r["timed_steps"] == 4 for r in report["results"].values())
        assert report["trainer_vs_loop"] > 0
    hw = json.loads((out / "resnet50-data-hw0.9" / "bench.json").read_text())
    assert list(hw["results"]) == ["data"] and hw["resolved_config"]["data"]["loader"]["hw_decoder_load"] == 0.9
    pipelines = json.loads((out / "data-pipelines.json").read_text())
    assert [name.split(" (")[0] for name in pipelines] == PIPELINES
    assert all(len(rates["runs"]) == 1 and rates["median"] > 0 for rates in pipelines.values())
    assert "1000 JPEGs" in (out / "data-pipelines.txt").read_text()  # the val folder: each class once
    summary = (out / "summary.md").read_text()
    assert "failed benchmarks: none" in summary and "deselected" in summary  # the gpu tests' pytest line
    assert all(f"## {name}\n" in summary for name in [*MODELS, "resnet50-data-hw0.9", "data pipelines"])
    assert "DALI CPU" in summary
    assert not list(out.rglob("*.JPEG"))  # the JPEGs stay out of what a GPU machine sends back


def test_an_unknown_mode_is_refused(tmp_path: Path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path), "--fast"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown mode --fast" in done.stderr
