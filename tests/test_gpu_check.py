"""scripts/gpu_check.sh on the CPU (its dry run: every step at toy sizes; a step past its limit; a stopped check),
and scripts/stage_wheels.sh's dependency check and JPEG subset, without a network."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from benchmarks.jpeg_set import rendered_files

from .conftest import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / "scripts" / "gpu_check.sh"
STAGE = PROJECT_ROOT / "scripts" / "stage_wheels.sh"
STEPS = [
    "wheels",
    "jpegs",
    "env",
    "pytest",
    "data-pipelines",
    "resnet50",
    "time-to-accuracy",
    "resnet50-data-hw0.9",
    "resnet18",
    "vgg16",
    "alexnet",
    "resnet50-compiled",
    "time-to-accuracy-compiles",
]
COMPILED = ["resnet50-compiled", "time-to-accuracy-compiles"]  # skipped in a dry run
PIPELINES = [
    "decode ceiling",
    "torchvision classic",
    "plain decode_jpeg + transforms.v2 on uint8",
    "torchvision fast path",
    "DALI CPU",
]
MODELS = {"resnet50": 4, "resnet18": 8, "vgg16": 2, "alexnet": 8}  # the dry run's batches
GPU_TESTS = [  # tests/test_gpu.py's gpu-marked tests, as pytest -v names them
    "test_two_gpus_over_nccl_with_gpu_decoding_learn_and_see_every_image_once",
    "test_mid_epoch_resume_with_gpu_decoding_replays_the_exact_samples",
    "test_fp16_mixed_with_fused_sgd_learns_and_saves_its_loss_scale",
    "test_compiled_training_compiles_each_mode_once",
    "test_the_gpu_jpeg_engine_decodes_what_the_pipeline_hands_it[train]",
    "test_the_gpu_jpeg_engine_decodes_what_the_pipeline_hands_it[val]",
]


def entries(summary: str) -> dict[str, str]:
    """Step -> its result, from the summary's ``## step: result`` headings (in the order they were appended)."""
    return dict(re.findall(r"^## (\S+): (.+)$", summary, flags=re.MULTILINE))


def check(out: Path, jpegs: Path, *options: str, env: dict | None = None, timeout: float = 900):
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), str(jpegs), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def few_jpegs(tmp_path: Path) -> Path:
    """Three small JPEGs named as ILSVRC samples are."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for i, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        Image.new("RGB", (40, 30), (80 * i, 60, 200)).save(folder / f"{wnid}_sample.JPEG")
    return folder


@pytest.mark.slow
def test_dry_run_runs_every_step_and_records_each_in_the_summary(tmp_path: Path):
    jpegs = tmp_path / "rendered"
    rendered_files(jpegs, per_class=1, short_side=80)  # one per ILSVRC class, as the samples are
    out = tmp_path / "gpu-check"
    done = check(out, jpegs, "--dry-run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    results = entries(summary)
    assert list(results) == STEPS  # one entry per step, in order
    assert all(re.fullmatch(r"ok, \d+ s", results[step]) for step in STEPS if step not in COMPILED), results
    assert all(results[step].startswith("skipped (dry run") for step in COMPILED), results
    assert f"JPEG_DIR {jpegs}: 1000 JPEGs" in summary and "**Done** in" in summary and ": none\n" in summary
    assert "nvidia-smi: not found" in summary and "versions: python" in summary  # the env step's figures
    assert "dmon: not recorded (no nvidia-smi here)" in summary
    for test in GPU_TESTS:  # collected from the explicit file list, skipped on this CPU
        assert f"test_gpu.py::{test} SKIPPED" in summary
    for model, batch in MODELS.items():
        report = json.loads((out / model / "bench.json").read_text())
        config = report["config"]
        assert (config["model"], config["batch"], config["data_loader"]) == (model, batch, "DaliLoaders")
        assert config["channels_last"] is True and config["optimizer_fused"] is True
        assert list(report["results"]) == ["data", "synthetic", "trainer", "loop"]
        assert all(r["images_per_s"] > 0 and r["timed_steps"] == 4 for r in report["results"].values())
        assert report["trainer_vs_loop"] > 0
        assert (out / model / "bench.md").read_text() in summary
    tta = json.loads((out / "time-to-accuracy" / "time_to_accuracy.json").read_text())
    config = tta["config"]
    assert (config["model"], config["batch"], config["data_loader"], config["channels_last"], config["rounds"]) == (
        "resnet50", 4, "DaliLoaders", True, 1,
    )  # fmt: skip
    assert list(tta["runs"]) == ["32", "48", "64", "ema", "mixing"]
    assert all(len(runs) == 1 and runs[0]["timed_steps"] == 4 for runs in tta["runs"].values())
    assert list(tta["sizes"]) == ["32", "48", "64"]
    assert list(tta["costs"]) == ["size", "ema", "mixing"]
    assert all(tta["costs"][name]["alone_ms"]["median"] > 0 for name in ("ema", "mixing")) and "compiles" not in tta
    assert (out / "time-to-accuracy" / "time_to_accuracy.md").read_text() in summary
    hw = json.loads((out / "resnet50-data-hw0.9" / "bench.json").read_text())
    assert list(hw["results"]) == ["data"] and hw["resolved_config"]["data"]["loader"]["hw_decoder_load"] == 0.9
    pipelines = json.loads((out / "data-pipelines.json").read_text())
    assert [name.split(" (")[0] for name in pipelines] == PIPELINES
    assert all(len(rates["runs"]) == 1 and rates["median"] > 0 for rates in pipelines.values())
    assert "1000 JPEGs" in (out / "data-pipelines.log").read_text()  # the val folder: each JPEG once
    assert "DALI CPU" in summary
    assert not list(out.rglob("*.JPEG"))  # the JPEGs stay out of what a GPU machine sends back


def test_a_step_past_its_limit_is_recorded_and_the_next_steps_still_run(tmp_path: Path, few_jpegs: Path):
    out = tmp_path / "gpu-check"
    # env imports torch and DALI: far more than half a second
    done = check(out, few_jpegs, "--dry-run", env={"GPU_CHECK_STEPS": "env,pytest", "GPU_CHECK_LIMITS": "env=0.5"})
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "failed: env" in done.stdout
    summary = (out / "summary.md").read_text()
    results = entries(summary)
    assert list(results) == STEPS
    assert results["env"].startswith("TIMED OUT after 0.5 s (its limit)")
    assert "last lines of env.log" in summary
    assert re.fullmatch(r"ok, \d+ s", results["pytest"])  # the next step ran all the same
    assert all(results[step] == "skipped (not in GPU_CHECK_STEPS)" for step in STEPS[4:-1])
    assert "failed, timed out or skipped for the budget: env" in summary


FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
# nvidia-smi as an H200 machine answers the check's calls
case "$*" in
  "") echo "| NVIDIA-SMI 570.124.06             Driver Version: 570.124.06     CUDA Version: 12.8     |" ;;
  "-q -d CLOCK") printf '%s\\n' "==============NVSMI LOG==============" "Driver Version : 570.124.06" \\
    "GPU 00000000:19:00.0" "    Clocks" "        Graphics      : 1980 MHz" "        SM            : 1980 MHz" \\
    "        Memory        : 3201 MHz" "    Applications Clocks" "        Graphics      : 1755 MHz" \\
    "    Max Clocks" "        Graphics      : 1980 MHz" "        Memory        : 3201 MHz" ;;
  dmon*) echo "#Time        gpu     sm    mem    enc    dec    jpg    ofa"
    echo "#HH:MM:SS    Idx      %      %      %      %      %      %"
    for i in $(seq 1000); do
      echo "18:00:00      0     20      5      0      -     $((i % 2 * 30))      0"; sleep 0.2
    done ;;
  *) exit 9 ;;
esac
"""


def test_the_machine_and_jpeg_engine_figures_come_from_nvidia_smi(tmp_path: Path):
    """With an nvidia-smi on the PATH (a stand-in, as an H200 machine answers): the env step records the driver,
    CUDA and clocks, and dmon runs beside the data benchmark, its sm, dec and jpg columns summed up."""
    bin_dir, jpegs = tmp_path / "bin", tmp_path / "jpegs"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    jpegs.mkdir()
    for i in range(16):  # two batches of 8 for each pipeline
        Image.new("RGB", (48, 40), (15 * i, 90, 160)).save(jpegs / f"n01440764_{i}.JPEG")
    out = tmp_path / "gpu-check"
    steps = {"GPU_CHECK_STEPS": "env,data-pipelines", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = check(out, jpegs, "--dry-run", env=steps)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert re.fullmatch(r"ok, \d+ s", entries(summary)["data-pipelines"])
    assert "NVIDIA-SMI 570.124.06 Driver Version: 570.124.06 CUDA Version: 12.8" in summary
    assert "Clocks: Graphics 1980 MHz, SM 1980 MHz, Memory 3201 MHz\n" in summary
    assert "Max Clocks: Graphics 1980 MHz, Memory 3201 MHz\n" in summary
    samples = re.search(
        r"dmon, (\d+) samples of 1 s \(mean / max %\): sm 20 / 20; mem 5 / 5; dec n/a; jpg (\d+) / 30;", summary
    )
    assert samples and int(samples.group(1)) >= 2, summary
    assert 0 < int(samples.group(2)) < 30  # the mean of 0s and 30s
    assert (out / "data-pipelines.dmon").read_text().startswith("#Time")


def _processes_with(text: str) -> list[int]:
    """The processes whose environment holds ``text`` (the check's steps get GPU_CHECK_OUT=OUT_DIR/gpu-tests)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if text in environ.read_bytes().decode(errors="replace"):
                found.append(int(environ.parent.name))
        except OSError:
            pass
    return found


def test_a_stopped_check_keeps_what_finished_and_ends_its_step(tmp_path: Path, few_jpegs: Path):
    out = tmp_path / "gpu-check"
    command = ["bash", str(SCRIPT), str(out), str(few_jpegs), "--dry-run"]
    env = {**os.environ, "GPU_CHECK_STEPS": "pytest"}
    running = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    log = out / "pytest.log"
    deadline = time.monotonic() + 120
    while not log.exists() and time.monotonic() < deadline and running.poll() is None:
        time.sleep(0.2)
    assert log.exists(), "the pytest step did not start"
    running.send_signal(signal.SIGTERM)
    assert running.wait(timeout=60) == 143, running.stderr.read()
    results = entries((out / "summary.md").read_text())
    assert list(results) == ["wheels", "jpegs", "env", "pytest"]
    assert results["wheels"].startswith("ok") and results["jpegs"].startswith("ok")
    assert results["pytest"].startswith("INTERRUPTED (the check was stopped)")
    deadline = time.monotonic() + 20
    while _processes_with(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_with(str(out)), "the stopped step's processes are still running"


def test_the_pytest_step_collects_every_file_with_gpu_tests_and_no_other():
    listed = re.search(r"^gpu_test_files=\(([^)]*)\)", SCRIPT.read_text(), flags=re.MULTILINE).group(1).split()
    holding = sorted(
        f"tests/{path.name}"
        for path in (PROJECT_ROOT / "tests").glob("test_*.py")
        if re.search(r"^\s*@pytest\.mark\.gpu\b", path.read_text(), flags=re.MULTILINE)
    )
    assert sorted(listed) == holding


@pytest.mark.parametrize(
    ("arguments", "env", "message"),
    [
        (["--fast"], {}, "unknown mode --fast"),
        ([], {"GPU_CHECK_LIMITS": "pytets=10"}, "GPU_CHECK_LIMITS: no step pytets"),
        ([], {"GPU_CHECK_STEPS": "env,resnet"}, "GPU_CHECK_STEPS: no step resnet"),
    ],
)
def test_unknown_modes_and_steps_are_refused(tmp_path: Path, few_jpegs: Path, arguments, env, message):
    done = check(tmp_path / "out", few_jpegs, *arguments, env=env, timeout=60)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "out" / "summary.md").exists()


def test_a_folder_without_jpegs_is_refused(tmp_path: Path):
    done = check(tmp_path / "out", tmp_path, env={}, timeout=60)
    assert done.returncode == 2 and f"JPEG_DIR {tmp_path}: not a folder of .JPEG files" in done.stderr


def _wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    """A wheel holding only its metadata: what the check reads."""
    lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    stem = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as archive:
        archive.writestr(f"{stem}.dist-info/METADATA", "Metadata-Version: 2.1\n" + "\n".join(lines) + "\n\nREADME\n")


def _check_wheels(folder: Path, preinstalled: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(STAGE), "--check", str(folder), str(preinstalled)], capture_output=True, text=True, timeout=60
    )


def test_the_wheel_check_names_each_dependency_left_out(tmp_path: Path):
    """DALI's declared dependencies, for Python 3.12 on Linux: six must be staged (it was not); numpy is on the GPU
    machine; nvimgcodec's `all` extra brings nvjpeg; markers for other Pythons and extras nobody asks for do not
    count."""
    wheels, preinstalled = tmp_path / "whl", tmp_path / "preinstalled.txt"
    wheels.mkdir()
    preinstalled.write_text("numpy\nPyYAML\n")
    _wheel(
        wheels,
        "nvidia-dali-cuda130",
        "2.4.0",
        "six<=1.17,>=1.16",
        "numpy",
        "nvidia-nvimgcodec-cu13[all]<0.10.0,>=0.9.0",
        'typing; python_version < "3.5"',
        'pytest-cov; extra == "test"',
    )
    _wheel(wheels, "nvidia-nvimgcodec-cu13", "0.9.0.20", 'nvidia-nvjpeg; extra == "all"', 'jax; extra == "jax"')
    _wheel(wheels, "nvidia-nvjpeg", "13.3.2.43")
    _wheel(wheels, "pyyaml-user", "1.0", 'pyyaml>=5.2; python_version < "3.13"', 'pyyaml-ft; python_version == "3.13"')

    missing = _check_wheels(wheels, preinstalled)
    assert missing.returncode == 1
    assert "six: no wheel staged, and not preinstalled (required by nvidia-dali-cuda130 2.4.0: six" in missing.stderr
    assert missing.stderr.count("\n  ") == 1  # six alone

    _wheel(wheels, "six", "1.15.0")
    too_old = _check_wheels(wheels, preinstalled)
    assert too_old.returncode == 1 and "six: 1.15.0 staged, nvidia-dali-cuda130 2.4.0 requires six" in too_old.stderr

    (wheels / "six-1.15.0-py3-none-any.whl").unlink()
    _wheel(wheels, "six", "1.17.0")
    complete = _check_wheels(wheels, preinstalled)
    assert complete.returncode == 0, complete.stderr
    assert "5 wheels: every dependency for Python 3.12 on Linux is staged or preinstalled" in complete.stdout

    (wheels / "nvidia_nvjpeg-13.3.2.43-py3-none-any.whl").unlink()  # asked for through the extra
    without_extra = _check_wheels(wheels, preinstalled)
    assert without_extra.returncode == 1 and "nvidia-nvjpeg: no wheel staged" in without_extra.stderr


def test_the_jpeg_subset_fits_its_size_and_spreads_over_the_samples(tmp_path: Path):
    samples, out = tmp_path / "samples", tmp_path / "stage"
    samples.mkdir()
    for i in range(10):  # 300 KiB each: 3 fit in 1 MiB
        (samples / f"n{i:08d}_x.JPEG").write_bytes(bytes(300 * 1024))
    (samples / "notes.txt").write_text("not a JPEG")
    done = subprocess.run(
        ["bash", str(STAGE), "--jpegs", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SAMPLES": str(samples), "STAGE_OUT": str(out)},
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (out / "jpegs").iterdir()) == [f"n{i:08d}_x.JPEG" for i in (0, 2, 4)]
    assert "3 of 10 samples" in done.stdout
