"""The record beside the result: every configured architecture has published figures, torchvision's are its installed
weights' own, and the record printed beside a run shows the run, every source and the warning."""

from __future__ import annotations

import math
import re

import pytest
from omegaconf import OmegaConf
from torchvision.models import get_model_weights

from models.published import COMPARABILITY_WARNING, PAPER_FIGURES, PublishedFigure, format_record, published_figures
from tests.conftest import PROJECT_ROOT

CONFIGURED = sorted(
    OmegaConf.load(path).net.arch for path in (PROJECT_ROOT / "conf" / "model").glob("*.yaml") if path.name[0] != "_"
)
PAPER_ARCHS = {
    "alexnet",
    *(f"vgg{depth}" for depth in (11, 13, 16, 19)),
    *(f"resnet{depth}" for depth in (18, 34, 50, 101, 152)),
}


def torchvision_rows(arch: str) -> list[PublishedFigure]:
    return [figure for figure in published_figures(arch) if figure.source.startswith("torchvision ")]


def test_the_configured_architectures_are_found():
    assert {"alexnet", "vgg11_bn", "resnet152"} <= set(CONFIGURED)


@pytest.mark.parametrize("arch", CONFIGURED)
def test_every_configured_architecture_has_the_papers_and_torchvisions_figures(arch: str):
    figures = published_figures(arch)
    assert all(figure.arch == arch for figure in figures)
    assert torchvision_rows(arch)
    assert (arch in PAPER_ARCHS) == any(figure in PAPER_FIGURES for figure in figures)
    papers = [figure for figure in figures if figure in PAPER_FIGURES]
    assert figures[: len(papers)] == papers  # the papers first


@pytest.mark.parametrize("arch", CONFIGURED)
def test_torchvisions_rows_are_its_installed_weights_meta(arch: str):
    expected = {}
    for weights in get_model_weights(arch):
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        if not math.isnan(metrics["acc@1"]):
            expected[f"{type(weights).__name__}.{weights.name}"] = (weights, metrics)
    rows = torchvision_rows(arch)
    assert len(rows) == len(expected)
    for row in rows:
        name = re.search(r", (\w+\.\w+), recipe ", row.source).group(1)
        weights, metrics = expected[name]
        assert row.top1_error == pytest.approx(100 - metrics["acc@1"])
        assert row.top5_error == pytest.approx(100 - metrics["acc@5"])
        assert weights.meta["recipe"] in row.source
        assert row.split == "ILSVRC-2012 val"
        transforms = weights.transforms()
        assert f"single {transforms.crop_size[0]} crop of {transforms.resize_size[0]}" in row.protocol


def test_torchvisions_resnet50_v2_row_reads_its_232_resize():
    (row,) = [row for row in torchvision_rows("resnet50") if "IMAGENET1K_V2" in row.source]
    assert row.protocol == "single model, single 224 crop of 232"


def test_the_papers_rows_name_a_table_a_split_and_a_protocol():
    for figure in PAPER_FIGURES:
        assert re.search(r", Table \d", figure.source), figure
        assert re.search(r"ILSVRC-20\d\d (val|test)|ImageNet test", figure.split), figure
        assert figure.protocol
        assert figure.top1_error is not None or figure.top5_error is not None


def test_the_papers_headline_figures():
    def row(arch: str, table: str, protocol_part: str):
        (figure,) = [
            f for f in PAPER_FIGURES if f.arch == arch and f"Table {table}" in f.source and protocol_part in f.protocol
        ]
        return figure.top1_error, figure.top5_error, figure.split

    assert row("alexnet", "1", "single") == (37.5, 17.0, "ILSVRC-2010 test")
    assert row("vgg16", "5", "multi-crop") == (24.4, 7.2, "ILSVRC-2012 val")
    assert row("resnet152", "4", "single") == (19.38, 4.49, "ILSVRC-2012 val")
    assert row("resnet152", "5", "ensemble") == (None, 3.57, "ImageNet test (ILSVRC-2015 server)")


def test_the_record_shows_the_run_every_source_and_the_warning():
    record = format_record("resnet50", 31.25, 11.5, "demo val (10 classes)")
    lines = record.splitlines()
    assert lines[2] == "| this run | 31.25 | 11.5 | demo val (10 classes) | | |"
    for figure in published_figures("resnet50"):
        assert figure.source in record
        assert f"| {figure.split} | {figure.protocol} | {figure.source}" in record
    assert "| 22.85 | 6.71 | ILSVRC-2012 val | single model, 10 crops |" in record
    assert COMPARABILITY_WARNING in record
    assert "10-class demo" in COMPARABILITY_WARNING


def test_the_record_numbers_its_notes():
    record = format_record("alexnet", 50.0, 25.0, "demo val (10 classes)")
    assert "| – | 15.3 | ILSVRC-2012 test |" in record
    footnotes = [line for line in record.splitlines() if line.startswith("[")]
    assert len(footnotes) == 2  # each note once, however many rows carry it
    assert footnotes[0].startswith("[1] the 2012 paper's net is split over two GPUs")
    assert record.count(" [1] |") == 7  # six of the paper's rows and torchvision's


def test_an_unknown_architecture_has_no_record():
    assert published_figures("my_custom_net") == []
    record = format_record("my_custom_net", 40.0, 20.0, "demo val (10 classes)")
    assert "| this run | 40.0 | 20.0 | demo val (10 classes) |" in record
    assert "No published figures" in record and COMPARABILITY_WARNING not in record
