"""The history in miniature: experiment=demo with every architecture (conf/experiment_model/demo/ holds each
family's settings), and `make history`, the AlexNet / VGG / ResNet sweep whose curves report.py overlays."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from report import FIGURES, draw, load_runs
from sweeps.summary import job_rows

from .conftest import PROJECT_ROOT, SMALL_RUN, build_module

MODELS = sorted(p.stem for p in (PROJECT_ROOT / "conf" / "model").glob("[!_]*.yaml"))
FAMILIES = ["alexnet", "vgg11_bn", "resnet18"]  # the Makefile's MODELS: one network per family, in history's order


@pytest.mark.parametrize("arch", MODELS)
def test_demo_builds_every_architecture_for_its_crops(make_cfg, arch: str):
    """Each model composes with the demo, gets zero-init residuals only where it has residuals, and takes the demo's
    64 px crops (AlexNet's smallest input is 63 px) to one logit per demo class."""
    cfg = make_cfg("experiment=demo", f"model={arch}")
    assert cfg.model.net.zero_init_residual == arch.startswith("resnet")
    spec = instantiate(cfg.data.spec)
    module = build_module(cfg.model, [f"n{i:08d}" for i in range(cfg.data.root.num_classes)], spec)
    with torch.no_grad():
        logits = module.net.eval()(torch.randn(2, 3, spec.image_size, spec.image_size))
    assert logits.shape == (2, cfg.data.root.num_classes) and torch.isfinite(logits).all()


def test_demo_keeps_the_resnet18_recipe(make_cfg):
    """`make train` (experiment=demo) trains ResNet-18 as before the per-family settings."""
    cfg = make_cfg("experiment=demo")
    assert (cfg.model.net.arch, cfg.model.net.zero_init_residual) == ("resnet18", True)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.lr_reference_batch) == (0.1, 5e-4, 256)
    assert (cfg.scheduler._target_, cfg.scheduler.warmup_epochs) == ("models.schedules.cosine", 1)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.data.spec.image_size) == (12, 50, 64)


def test_family_settings_yield_to_the_command_line_and_stay_in_the_demo(make_cfg):
    demo_alexnet = make_cfg("experiment=demo", "model=alexnet")
    assert demo_alexnet.optimizer.lr != make_cfg("experiment=demo").optimizer.lr  # its own rate
    assert make_cfg("experiment=demo", "model=alexnet", "optimizer.lr=0.3").optimizer.lr == 0.3
    # another experiment with the same model keeps its own recipe (the paper's rate per 128 images)
    paper = make_cfg("experiment=alexnet", "data.root=x")
    assert (paper.optimizer.lr, paper.lr_reference_batch) == (0.01, 128)


@pytest.mark.slow
def test_make_history_trains_the_three_families_and_overlays_their_curves(make_cfg, tmp_path: Path, cache_dir: Path):
    """`make history` as documented, on the small demo (64 px: AlexNet's smallest input) for 2 short epochs: three
    jobs of one Hydra multirun, each with its family's settings, a checkpoint and final metrics; report.py's error and
    per-epoch throughput plots hold one curve per job, named by its model, drawn from that job's logged values."""
    history = tmp_path / "history"
    overrides = [
        *(o for o in SMALL_RUN if o != "experiment=demo"),  # the target sets the experiment
        f"paths.cache_dir={cache_dir}",
        "data.spec.image_size=64",
        "data.spec.val_resize_size=72",
        "trainer.max_epochs=2",
        "+trainer.limit_train_batches=3",
        "callbacks.model_checkpoint.save_top_k=1",  # VGG-11's checkpoint is 1 GB: one top-1 file and last.ckpt
    ]
    venv = Path(sys.prefix)  # this interpreter's environment, taken as installed (-o: no reinstall)
    command = ["make", "-o", f"{venv}/.installed", "history", f"VENV={venv}", f"HISTORY_DIR={history}"]
    result = subprocess.run(
        [*command, f"ARGS={' '.join(overrides)}"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = job_rows(history)
    assert [row["state"] for row in rows] == ["done"] * 3
    for row, arch in zip(rows, FAMILIES):
        job = Path(row["folder"])
        assert f"model={arch}" in row["overrides"].split()
        ran, composed = OmegaConf.load(job / ".hydra" / "config.yaml"), make_cfg("experiment=demo", f"model={arch}")
        assert ran.model.net.arch == arch
        assert ran.model.net.zero_init_residual == composed.model.net.zero_init_residual == arch.startswith("resnet")
        assert ran.optimizer.lr == composed.optimizer.lr  # the family's rate reached the sweep's job
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (history / "report").glob("*.png")) == sorted(f"{name}.png" for name in FIGURES)

    runs = load_runs(history)
    figures = draw(runs, "history")
    labels = [f"{row['job']}: model={arch}" for row, arch in zip(rows, FAMILIES)]
    for ax, metric in zip(figures["error"].axes, ("val/acc1", "val/acc5")):
        assert [line.get_label() for line in ax.get_lines()] == labels
        for line, row, (_, by_epoch) in zip(ax.get_lines(), rows, runs.values()):
            assert list(line.get_xdata()) == [0, 1]
            assert list(line.get_ydata()) == pytest.approx([1 - by_epoch[metric][epoch] for epoch in (0, 1)])
            final = json.loads((Path(row["folder"]) / "metrics.json").read_text())[metric]
            assert line.get_ydata()[-1] == pytest.approx(1 - final, abs=1e-6)  # the job's final result
    per_epoch_rate = figures["throughput"].axes[-1]
    assert [line.get_label() for line in per_epoch_rate.get_lines()] == labels
    assert all(list(line.get_xdata()) == [0, 1] and min(line.get_ydata()) > 0 for line in per_epoch_rate.get_lines())
    for figure in figures.values():
        plt.close(figure)
