"""The benchmark suite end to end at small sizes, as a user runs it: its JSON, its table, its exact step counts."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from benchmarks import jpeg_set, shard_io
from benchmarks.resize_parity import GPU_PIPELINE
from data.ilsvrc import load_layout
from models.card import CARD
from tests.odd_images import picture

from .conftest import PROJECT_ROOT, SHARED_DATA, SMALL_RUN, build_module

MEASUREMENTS = ("data", "synthetic", "trainer", "loop")


@pytest.mark.slow
def test_suite_measures_all_four_and_writes_json_and_table(tmp_path: Path, cache_dir: Path):
    out = tmp_path / "bench"
    command = [
        sys.executable, "-m", "benchmarks.suite", "--out", str(out), "--warmup", "2", "--windows", "2",
        "--window-steps", "3", "--repeats", "2", f"paths.cache_dir={cache_dir}", *SMALL_RUN, "data.batch_size=8",
        "data/loader=dali", "model.channels_last=true", "optimizer.fused=true",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    config = report["config"]
    assert (config["model"], config["batch"], config["image_size"], config["data_loader"]) == (
        "resnet18",
        8,
        32,
        "DaliLoaders",
    )
    assert config["channels_last"] is True and config["optimizer_fused"] is True and config["device"] == "cpu"
    assert list(report["results"]) == list(MEASUREMENTS)
    for name, result in report["results"].items():
        assert result["timed_steps"] == 2 * 2 * 3 and len(result["images_per_s_windows"]) == 2 * 2, name
        assert all(rate > 0 for rate in result["images_per_s_windows"]), name
        assert min(result["images_per_s_windows"]) <= result["images_per_s"] <= max(result["images_per_s_windows"])
        steps = result["step_time_ms"]
        assert 0 < steps["p50"] <= steps["p90"] <= steps["p99"], name
        assert result["host_peak_rss_gb"] > 0.1, name
    for name in ("trainer", "loop"):
        assert 0 <= report["results"][name]["data_wait_fraction"] <= 1
        assert 0 < report["results"][name]["mfu"] < 1
    assert report["results"]["data"]["data_wait_fraction"] == pytest.approx(1, abs=0.05)  # all it does is wait
    assert report["results"]["synthetic"]["data_wait_fraction"] is None
    ratio = report["results"]["trainer"]["images_per_s"] / report["results"]["loop"]["images_per_s"]
    assert report["trainer_vs_loop"] == pytest.approx(ratio)
    # forward + backward = 3 x forward; torchvision's 1.81 GMACs (2 FLOPs each) at 224 px scale with the pixels
    assert report["training_flops_per_image"] == pytest.approx(3 * 2 * 1.82e9 * (32 / 224) ** 2, rel=0.1)
    assert report["peak_flops"]["measured_matmul"] > 1e9 and report["peak_flops"]["datasheet"] is None
    machine = report["machine"]
    assert machine["cpu_cores"] == os.cpu_count() and machine["torch"] == torch.__version__ and machine["gpu"] is None
    table = (out / "bench.md").read_text()
    assert "| measurement | img/s |" in table and "trainer / plain loop:" in table
    assert all(f"| {name} |" in table for name in MEASUREMENTS)


@pytest.mark.slow
def test_time_to_accuracy_measures_each_size_both_costs_and_the_compilations(tmp_path: Path, cache_dir: Path):
    """benchmarks/time_to_accuracy.py at toy sizes: a row per size, per cost and per compilation, in its JSON and
    table; each cost run switches its feature off, on by window; the compiled ramp (train 32 px, eval 64 px, train
    64 px) compiles the network at most once per input."""
    out = tmp_path / "tta"
    command = [
        sys.executable, "-m", "benchmarks.time_to_accuracy", "--out", str(out), "--sizes", "32,64", "--repeats", "2",
        "--warmup", "1", "--windows", "2", "--window-steps", "2", "--compile-batches", "1",
        f"paths.cache_dir={cache_dir}", *SMALL_RUN, "data.batch_size=4",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "time_to_accuracy.json").read_text())
    assert (report["config"]["model"], report["config"]["batch"], report["config"]["device"]) == ("resnet18", 4, "cpu")
    assert list(report["runs"]) == ["32", "64", "ema", "mixing"]
    assert all(len(runs) == 2 and all(run["timed_steps"] == 4 for run in runs) for runs in report["runs"].values())
    assert list(report["sizes"]) == ["32", "64"]
    for row in report["sizes"].values():
        assert row["images_per_s"]["median"] > 0 and len(row["of_pixel_scaling"]["rounds"]) == 2
    assert report["sizes"]["64"]["of_pixel_scaling"]["rounds"] == [1.0, 1.0]
    small, large = (report["sizes"][size]["images_per_s"]["rounds"] for size in ("32", "64"))
    expected = [rate / (big * (64 / 32) ** 2) for rate, big in zip(small, large)]
    assert report["sizes"]["32"]["of_pixel_scaling"]["rounds"] == pytest.approx(expected)
    costs = report["costs"]
    assert list(costs) == ["size", "ema", "mixing"] and costs["size"] == 64
    for name in ("ema", "mixing"):  # alone_ms: the module had an average / a mixing to time
        assert all(run["on_in_timed_steps"] == [False, False, True, True] for run in report["runs"][name]), name
        assert len(costs[name]["cost"]["rounds"]) == 2 and costs[name]["alone_ms"]["min"] > 0, name
        on, off = (costs[name][f"images_per_s_{key}"]["rounds"] for key in ("on", "off"))
        assert costs[name]["cost"]["rounds"] == pytest.approx([b / a - 1 for a, b in zip(on, off)]), name
    assert costs["ema"]["overrides"] == ["model.ema.decay=0.9999", "model.ema.every_n_steps=1"]
    compiles = report["compiles"]
    assert compiles["inputs"] == [
        {"mode": "train", "shape": [4, 3, 32, 32]},
        {"mode": "eval", "shape": [4, 3, 64, 64]},
        {"mode": "train", "shape": [4, 3, 64, 64]},
    ]
    assert 1 <= compiles["compilations"] <= compiles["distinct_inputs"] == 3 and compiles["at_most_one_per_input"]
    assert all(record["function"] == "forward" and record["failure"] is None for record in compiles["records"])
    assert compiles["records"][0]["recompile_reason"] is None and compiles["fit_seconds"] > 0
    table = (out / "time_to_accuracy.md").read_text()
    rows = ["| 32 px |", "| 64 px |", "| EMA (decay 0.9999", "| MixUp 0.2 / CutMix 1.0 |", "| 0/0 | forward |"]
    assert all(row in table for row in rows) and table in done.stdout + "\n"


def test_jpeg_set_links_real_samples_into_the_ilsvrc_layout(tmp_path: Path):
    samples = sorted((SHARED_DATA / "imagenet-samples").glob("*.JPEG"))[:3]
    if not samples:
        pytest.skip("../shared/data/imagenet-samples is absent")
    layout = load_layout(jpeg_set.link_layout(samples, tmp_path / "root", copies=2))
    assert layout.wnids == [path.name.split("_")[0] for path in samples]
    assert (len(layout.train), len(layout.val)) == (6, 3)
    assert sorted(layout.train.labels) == [0, 0, 1, 1, 2, 2]
    originals = {sample.resolve() for sample in samples}  # ../shared may itself be a link
    assert {Path(path).resolve() for path in layout.train.paths} == originals  # links to them, not copies
    with pytest.raises(ValueError, match="tench.JPEG: the name does not start with an ILSVRC wnid"):
        jpeg_set.link_layout([tmp_path / "tench.JPEG"], tmp_path / "bad", copies=1)


def test_shard_io_counts_every_open_and_evicts_mapped_pages(tmp_path: Path):
    """benchmarks/shard_io.py's machinery: inotify counts each open of a dataset file, by kind and by any process,
    and no stat or listing; its eviction empties the page cache of the files, a page mapped in this process too."""
    folder = tmp_path / "data" / "n01440764"
    folder.mkdir(parents=True)
    files = [folder / f"n01440764_{i}.JPEG" for i in range(5)] + [folder / "train-0.tar", folder / "train-0.idx"]
    for file in files:
        file.write_bytes(os.urandom(3 * mmap.PAGESIZE))
    with shard_io.OpenCounter([tmp_path / "data"]) as counter:
        start = counter.snapshot()
        for file in files:
            file.read_bytes()
        subprocess.run([sys.executable, "-c", f"open({str(files[0])!r}, 'rb').read()"], check=True)
        os.stat(files[1])
        os.listdir(folder)
        counted = counter.settled() - start
    assert counted.pop("directories") >= 1  # the listing (a process may open a folder for its own reasons)
    assert counted == Counter(images=6, shards=1, index=1) and shard_io.files_opened(counted) == 8
    with open(files[-2], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert sum(mapped[:: mmap.PAGESIZE]) >= 0  # every page read through the mapping, which stays
        share, opened = shard_io.resident_share(files)
        assert share == 1 and opened == Counter(images=5, shards=1, index=1)
        assert shard_io.evict(files) == opened
        if shard_io.disk(tmp_path)["filesystem"] != "tmpfs":  # tmpfs pages have no disk to be read back from
            assert shard_io.resident_share(files)[0] == 0


@pytest.mark.slow
def test_data_pipelines_benchmark_measures_every_pipeline(small_demo_root: Path, tmp_path: Path):
    out = tmp_path / "pipelines.json"
    command = [
        sys.executable, "benchmarks/data_pipelines.py", str(small_demo_root / "train"), "--threads", "1",
        "--batch", "8", "--epochs", "1", "--repeats", "2", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "240 JPEGs" in done.stdout and "1 threads/workers" in done.stdout
    report = json.loads(out.read_text())
    expected = ["decode ceiling", "torchvision classic", "plain decode_jpeg + transforms.v2 on uint8"]
    expected += ["torchvision fast path", "DALI CPU"]
    expected += ["DALI GPU"] if torch.cuda.is_available() else []
    assert [name.split(" (")[0] for name in report] == expected
    for name, rates in report.items():
        assert len(rates["runs"]) == 2 and all(rate > 0 for rate in rates["runs"]), name
        assert name in done.stdout


def test_resize_parity_benchmark_shows_the_gpu_pipeline_resizing_as_torchvision(
    small_demo_root: Path, tmp_path: Path, make_cfg
):
    """On the CPU, DALI's fn.resize as the GPU pipeline configures it (torchvision's output size, linear,
    antialiased) gives torchvision's sizes and nearly its pixels; DALI's own resize_shorter does neither, on images
    of ILSVRC's usual sizes (a longer side of 341.3 or 455.6 pixels at 256)."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for height, width in ((375, 500), (500, 375), (281, 500), (333, 500)):
        picture(height, width).save(folder / f"{height}x{width}.JPEG", quality=95)
    checkpoint = tmp_path / "model.ckpt"
    module = build_module(make_cfg().model, sorted(p.name for p in (small_demo_root / "train").iterdir()))
    torch.save({"state_dict": module.state_dict(), CARD: module.card.to_dict()}, checkpoint)
    out = tmp_path / "parity.json"
    command = [sys.executable, "-m", "benchmarks.resize_parity", str(folder), "--checkpoint", str(checkpoint)]
    done = subprocess.run([*command, "--json", str(out)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 4 and "4 JPEGs" in done.stdout
    ours = report["pixel_error"][GPU_PIPELINE]
    assert ours["same_size"] == 1.0 and ours["mean_abs"] < 0.5 and ours["psnr_db"] > 45
    dalis = report["pixel_error"]["resize_shorter (DALI's default rounding), linear"]
    assert dalis["same_size"] == 0.75 and dalis["mean_abs"] > 1.5 * ours["mean_abs"]  # 281x500: 456 wide, not 455
    assert report["top1_agreement"].keys() == report["pixel_error"].keys()
