"""The start of a run's log is the project's own: each rank's banner (where it runs, on which cores, decoding where),
no library advertisements or deprecations a user cannot act on, no FLOPs nobody counted; and on a terminal the log
lines go above the rich bar, which shows what a user reads and is left once at the end."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from rich import get_console
from rich.text import Text

from callbacks.model_summary import ModelSummaryWithoutUncountedFlops
from callbacks.rank_banner import RankBanner, cpu_list, device_name
from data.dali import DaliLoaders
from data.placement import Placement
from loggers.quiet import LIGHTNING_RANK_ZERO_LOGGERS, DropLightningNotices, quiet_libraries
from tests.conftest import PROJECT_ROOT, SMALL_RUN

WIDTH = 120
LOG_RECORD = re.compile(r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\]\[")  # Hydra's prefix: [date time][logger]
CSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TERMINAL_TOKEN = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\r|\n|[^\x1b\r\n]")


def test_cpu_list_writes_ranges_as_linux_does():
    assert cpu_list([11, 0, 1, 2, 3, 8, 10]) == "0-3,8,10-11"
    assert cpu_list([5]) == "5" and cpu_list([]) == ""


def banner_trainer(placement: Placement) -> SimpleNamespace:
    """What the banner reads of a Trainer: rank 1 of 2 on the CPU, with the DALI loader's datamodule."""
    datamodule = SimpleNamespace(placement=placement, loader=DaliLoaders())
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(
        global_rank=1, world_size=2, local_rank=1, num_devices=2, strategy=strategy, precision="bf16-mixed",
        datamodule=datamodule,
    )  # fmt: skip


def test_rank_banner_says_where_the_rank_runs(monkeypatch, caplog):
    for name, value in {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_CPUS_PER_TASK": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3, 4, 5})
    placement = Placement(torch.device("cpu"), workers=3, cpus=(2, 3, 4, 5), precision="bf16-mixed")
    with caplog.at_level(logging.INFO, logger="callbacks.rank_banner"):
        RankBanner().setup(banner_trainer(placement), None, "fit")
    (banner,) = [r.getMessage().splitlines() for r in caplog.records if r.levelno == logging.INFO]
    assert banner == [
        f"rank 1 of 2 (local rank 1 of 2) on {os.uname().nodename}",
        "rank 1 device: CPU",
        "rank 1 cores it may run on: 2-5 (4)",
        "rank 1 data: JPEGs decoded on CPU (DALI, 3 thread(s)); data cores 2-5",
        "rank 1 precision: bf16-mixed",
        "rank 1 SLURM: SLURM_JOB_ID=7, SLURM_PROCID=1, SLURM_CPUS_PER_TASK=4",
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # a right binding warns of nothing


def test_rank_banner_warns_of_a_wrong_binding(monkeypatch, caplog):
    """srun without --cpus-per-task under SLURM 22.05-23.02: one core of the 4 the job gives each task."""
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2})
    placement = Placement(torch.device("cpu"), workers=3, cpus=(2,), precision="32-true")
    with caplog.at_level(logging.INFO, logger="callbacks.rank_banner"):
        RankBanner().setup(banner_trainer(placement), None, "fit")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2
    assert warned[0].startswith("rank 1 may run on 1 core(s) but the job gives each task 4 (SLURM_CPUS_PER_TASK)")
    assert "srun --cpus-per-task=$SLURM_CPUS_PER_TASK" in warned[0]
    assert warned[1].startswith("rank 1 runs 3 data thread(s) or worker(s) on 1 core(s)")


@pytest.mark.gpu
def test_banner_names_the_gpu_as_nvidia_smi_lists_it():
    """Index (torch's, which CUDA_VISIBLE_DEVICES renumbers), then name and UUID as ``nvidia-smi -L`` has them."""
    if not shutil.which("nvidia-smi"):
        pytest.skip("no nvidia-smi")
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout.splitlines()
    named = device_name(torch.device("cuda", 0))
    assert named.startswith(f"GPU 0: {torch.cuda.get_device_name(0)} (UUID: GPU-")
    (line,) = [line for line in listed if named.split("UUID: ")[1] in line]
    assert line.split(": ", 1)[1] == named.split(": ", 1)[1]


class TinyModule(pl.LightningModule):
    def __init__(self, example: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 2)
        self.example_input_array = example

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@pytest.mark.parametrize("counted", [False, True], ids=["uncounted", "counted"])
def test_model_summary_shows_flops_only_where_counted(counted: bool):
    """Lightning counts FLOPs only with an example input; without one its summary says ``Total FLOPs: 0``."""
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module = TinyModule(torch.zeros(1, 8) if counted else None)
    with get_console().capture() as printed:
        ModelSummaryWithoutUncountedFlops().on_fit_start(trainer, module)
    summary = Text.from_ansi(printed.get()).plain  # the shared console may have met a terminal in an earlier test
    assert "Total params: 18" in summary and "Linear" in summary
    assert ("FLOPs" in summary) == counted
    assert ("Total FLOPs: 32" in summary) == counted  # 2 x 8 x 2 multiply-adds of one example


WARNED = {  # the first two as torch and Lightning word them
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead.": FutureWarning,
    "The `srun` command is available on your system but is not used. HINT: ...": UserWarning,
    "a warning of the project's own": UserWarning,
}


def test_quiet_libraries_drops_lightning_notices_and_pinned_deprecations():
    lightning_log = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGERS[0])
    records: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = records.append
    lightning_log.addHandler(keep)
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            quiet_libraries()
            quiet_libraries()  # a second call adds nothing
            for message, category in WARNED.items():
                warnings.warn(message, category, stacklevel=1)
            pl.Trainer(accelerator="cpu", logger=False, callbacks=[ModelSummaryWithoutUncountedFlops()])
        assert [str(w.message) for w in warned] == ["a warning of the project's own"]
        shown = [r.getMessage() for r in records]
        assert shown and not [m for m in shown if "Tip" in m or "already configured with model summary" in m]
        assert sum(isinstance(f, DropLightningNotices) for f in lightning_log.filters) == 1
    finally:
        lightning_log.removeHandler(keep)
        for name in LIGHTNING_RANK_ZERO_LOGGERS:
            for installed in [f for f in logging.getLogger(name).filters if isinstance(f, DropLightningNotices)]:
                logging.getLogger(name).removeFilter(installed)


def terminal_screen(output: str, width: int = WIDTH) -> list[str]:
    """The lines a terminal this wide shows (and scrolled past) after ``output``: as much of a VT100 as rich's live
    display uses (carriage return, newline, cursor up, erase line; colours ignored) and wrapping at the edge."""
    rows: list[list[str]] = [[]]
    row = col = 0
    for match in TERMINAL_TOKEN.finditer(output):
        token, command = match.group(), match.group(2)
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
        elif command == "A":
            row = max(0, row - int(match.group(1) or 1))
        elif command == "K":
            rows[row] = [] if match.group(1) == "2" else rows[row][:col]
        elif command is None:
            if col == width:  # the character after the last column starts the next line
                row, col = row + 1, 0
            rows.extend([] for _ in range(row + 1 - len(rows)))
            rows[row].extend(" " * (col + 1 - len(rows[row])))
            rows[row][col] = token
            col += 1
        rows.extend([] for _ in range(row + 1 - len(rows)))
    return ["".join(r).rstrip() for r in rows]


def test_terminal_screen_follows_rich_redraws():
    bar = "\r\x1b[2KEpoch 0 1/2" + "\r\x1b[2KEpoch 0 2/2"
    assert terminal_screen(bar + "\r\nlog\r\n") == ["Epoch 0 2/2", "log", ""]
    assert terminal_screen("x" * 5 + "\r\n\x1b[1A\x1b[2Ky", width=3) == ["xxx", "y", ""]


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory: pytest.TempPathFactory, small_demo_root: Path, cache_dir: Path) -> str:
    """What ``python train.py experiment=demo`` (small) writes to a 120-column terminal, colours and redraws
    included: its stdout and stderr are a pseudo-terminal, as with ``make train``."""
    run_dir = tmp_path_factory.mktemp("terminal")
    overrides = [o for o in SMALL_RUN if not o.startswith("trainer.")]
    command = [
        sys.executable,
        "train.py",
        *overrides,
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=5",
        f"paths.cache_dir={cache_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, WIDTH, 0, 0))
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environment.update(COLUMNS=str(WIDTH), LINES="40", TERM="xterm-256color")
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=environment, stdin=follower, stdout=follower, stderr=follower, close_fds=True
    )
    os.close(follower)
    output = bytearray()
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the terminal's other side closed, the run ended
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(timeout=60) == 0, output.decode(errors="replace")[-3000:]
    return output.decode(errors="replace")


def test_terminal_shows_log_lines_above_the_bar_and_the_last_bar_once(terminal_run: str):
    plain = CSI.sub("", terminal_run)
    starts = [m.start() for m in LOG_RECORD.finditer(plain)] + [plain.index("`Trainer.fit` stopped")]
    glued = [plain[max(0, s - 60) : s + 60] for s in starts if s and plain[s - 1] not in "\r\n"]
    assert not glued, "log lines written into the bar's line:\n" + "\n".join(glued)
    assert "v_num" not in terminal_run
    screen = terminal_screen(terminal_run)
    bars = [line for line in screen if line.startswith("Epoch 0/0")]
    assert len(bars) == 1, "\n".join(screen[-30:])  # the last epoch's bar, left once when the run ends
    final_bar = re.sub(r"\s+", " ", " ".join(screen[screen.index(bars[0]) :]))
    assert re.search(r"12/12 .* loss: \d\.\d{3} img/s: [\d.]+", final_bar)
    assert not [line for line in screen if line.startswith(("Validation", "Sanity Checking"))]
    throughput = [line for line in screen if "[callbacks.throughput][INFO] - Epoch 0: " in line]
    assert len(throughput) == 1 and LOG_RECORD.match(throughput[0])  # whole, and starting its line


def test_start_of_the_log_is_the_projects_own(terminal_run: str):
    screen = terminal_screen(terminal_run)
    cores = sorted(os.sched_getaffinity(0))
    assert f"rank 0 cores it may run on: {cpu_list(cores)} ({len(cores)})" in screen
    assert "rank 0 data: JPEGs decoded on CPU (torchvision, 0 DataLoader worker(s)); data cores" in "\n".join(screen)
    foreign = [
        line
        for line in screen
        if re.search(r"litlogger|Tip:|FLOPs|deprecated|DeprecationWarning|FutureWarning|srun|already configured", line)
    ]
    assert not foreign, "\n".join(foreign)
