"""The rank the others wait for: named at each logging step with its ratio to the others, warned of when it stays
slow; in 2-process DDP on the CPU (gloo) through train.py, and in its arithmetic."""

from __future__ import annotations

import csv
import logging
import socket
from pathlib import Path

import pytest

from callbacks.stragglers import Stragglers, own_step_times, ratios_to_the_others

from .conftest import SMALL_RUN, run_train

WARNING = "has been more than 1.5x slower than the other ranks' median for 3 logs in a row"


def test_a_rank_that_waits_longer_for_data_is_the_one_the_others_wait_for():
    """Same step time on every rank (DDP's all-reduce), 0.6 of 1.0 s spent between steps by rank 1: the others'
    own time is 0.4 s."""
    assert own_step_times([1.0, 1.0, 1.0], [0.0, 0.6, 0.0]) == pytest.approx([0.4, 1.0, 0.4])
    assert ratios_to_the_others([0.4, 1.0, 0.4]) == pytest.approx([0.57, 2.5, 0.57], abs=0.01)
    assert ratios_to_the_others(own_step_times([0.3, 0.3], [0.05, 0.05])) == pytest.approx([1.0, 1.0])


def test_a_warning_once_a_streak_of_slow_windows_reaches_the_count(caplog: pytest.LogCaptureFixture):
    stragglers = Stragglers(factor=1.5, logs_in_a_row=3)
    stragglers.hosts = ["node-a", "node-b"]
    slow, equal = ([1.0, 1.0], [0.0, 0.6]), ([1.0, 1.0], [0.0, 0.0])
    with caplog.at_level(logging.WARNING, logger="callbacks.stragglers"):
        for window in (slow, slow, equal, slow, slow):  # broken streak: no warning
            assert stragglers.observe(*window, warn=True)["perf/slowest_ratio"] > 0
        assert not caplog.records
        metrics = stragglers.observe(*slow, warn=True)
    assert metrics == {"perf/slowest_rank": 1.0, "perf/slowest_ratio": pytest.approx(2.5)}
    assert [record.getMessage()[:80] for record in caplog.records] == [
        "Rank 1 on node-b has been more than 1.5x slower than the other ranks' median for 3 logs in a row"[:80]
    ]
    assert stragglers.describe() == "slowest rank 1 on node-b, 2.50x the others' median"


def _metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return [row for row in csv.DictReader(f) if row.get("perf/slowest_ratio")]


@pytest.mark.parametrize("slow_rank", [True, False], ids=["rank-1-slow", "equal-ranks"])
def test_ddp_names_the_slow_rank_and_warns_with_its_host(tmp_path: Path, slow_rank: bool):
    """Rank 1 takes 0.6 s longer to get each batch (tests.observers.SlowRank): every report names it at more than
    1.5x the other's time, and the third in a row warns with its host. With equal ranks: no warning, ratios near 1."""
    slow = ["+callbacks.slow._target_=tests.observers.SlowRank", "+callbacks.slow.rank=1", "+callbacks.slow.seconds=.6"]
    run_dir = tmp_path / "run"
    result = run_train(
        *SMALL_RUN,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        *(slow if slow_rank else []),
        cache_dir=tmp_path / "cache",
        run_dir=run_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr  # Hydra's console handler writes to stdout
    rows = _metrics(run_dir)
    assert len(rows) == 6  # log_every_n_steps=1: a report per step, 6 steps
    ratios = [float(row["perf/slowest_ratio"]) for row in rows]
    if slow_rank:
        assert [row["perf/slowest_rank"] for row in rows] == ["1.0"] * 6
        assert min(ratios) > 1.5, ratios
        assert f"Rank 1 on {socket.gethostname()} {WARNING}" in log
        assert f"slowest rank 1 on {socket.gethostname()}" in log  # the epoch's line
    else:
        assert max(ratios) < 1.5, ratios
        assert WARNING not in log
