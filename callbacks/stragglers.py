"""Which rank the others wait for: each rank's step time and data-wait fraction over a reporting window, gathered
over the CPU group, compared, and a warning for a rank that stays slow."""

from __future__ import annotations

import logging
import socket
import statistics

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from callbacks.cpu_group import cpu_group
from callbacks.heartbeat import collective

log = logging.getLogger(__name__)

SHORTEST_OWN_S = 1e-6  # a floor for clock noise: a rank that waited for data all its step still gets a ratio


def own_step_times(step_times: list[float], wait_fractions: list[float]) -> list[float]:
    """Each rank's step time without its wait for the others.

    DDP's gradient all-reduce holds every rank to the slowest one, so the step time (a window's seconds per step)
    is the same on all; what differs is where each spent it. A rank slow to get its batch waits for data longest,
    and the others wait for it inside their step, for the difference: a rank's own time is its step time less that
    difference (a rank slow in the callbacks after its step counts that as its wait for data, too). Not told apart
    from the host's clocks: a rank slow on its device, for which every rank's host waits alike.
    """
    waits = [time * fraction for time, fraction in zip(step_times, wait_fractions)]
    longest = max(waits)
    return [max(SHORTEST_OWN_S, time - (longest - wait)) for time, wait in zip(step_times, waits)]


def ratios_to_the_others(times: list[float]) -> list[float]:
    """Each rank's time over the median of the other ranks' (with 2 ranks a median of all would hold the slow one
    itself, and no ratio could exceed 2)."""
    return [time / statistics.median(times[:rank] + times[rank + 1 :]) for rank, time in enumerate(times)]


class Stragglers:
    """At each reporting window of the ThroughputMonitor: one all_gather of 2 numbers per rank over the CPU group,
    the slowest rank and its ratio to the others' median for the loggers, and a WARNING naming the rank and its
    host when a rank is more than ``factor`` times slower for ``logs_in_a_row`` windows in a row. The hosts are
    gathered once, at the start of training."""

    def __init__(self, factor: float, logs_in_a_row: int) -> None:
        self.factor, self.logs_in_a_row = factor, logs_in_a_row
        self.hosts: list[str] = []
        self.slowest: tuple[int, float] | None = None  # (rank, ratio) of the last window
        self._group: dist.ProcessGroup | None = None
        self._streaks: list[int] = []

    def start(self, trainer: pl.Trainer) -> None:
        """Every rank, at the same point (collective)."""
        self._group = cpu_group() if trainer.world_size > 1 else None
        if self._group is None:
            return
        self.hosts = [""] * trainer.world_size
        with collective("hosts"):
            dist.all_gather_object(self.hosts, socket.gethostname(), group=self._group)

    def compare(self, trainer: pl.Trainer, step_time_s: float, data_wait_fraction: float) -> dict[str, float]:
        """Every rank, at the same step (collective); the metrics to log (none with one rank)."""
        if self._group is None:
            return {}
        mine = torch.tensor([step_time_s, data_wait_fraction], dtype=torch.float64)
        gathered = [torch.empty_like(mine) for _ in range(trainer.world_size)]
        with collective("step times"):
            dist.all_gather(gathered, mine, group=self._group)
        step_times, wait_fractions = torch.stack(gathered).T.tolist()
        return self.observe(step_times, wait_fractions, warn=trainer.is_global_zero)

    def observe(self, step_times: list[float], wait_fractions: list[float], warn: bool) -> dict[str, float]:
        """One window's figures of every rank: the slowest rank and its ratio; a warning (where ``warn``) for a rank
        whose streak of slow windows reaches ``logs_in_a_row`` (once per streak)."""
        ratios = ratios_to_the_others(own_step_times(step_times, wait_fractions))
        rank = max(range(len(ratios)), key=ratios.__getitem__)
        self.slowest = (rank, ratios[rank])
        streaks = self._streaks or [0] * len(ratios)
        self._streaks = [streak + 1 if ratio > self.factor else 0 for streak, ratio in zip(streaks, ratios)]
        for slow, streak in enumerate(self._streaks):
            if warn and streak == self.logs_in_a_row:
                log.warning(
                    "Rank %d on %s has been more than %gx slower than the other ranks' median for %d logs in a row "
                    "(%.2fx now; it waits for data %.0f%% of its step, the median rank %.0f%%): the others wait for "
                    "it at every step",
                    slow,
                    self.hosts[slow],
                    self.factor,
                    streak,
                    ratios[slow],
                    100 * wait_fractions[slow],
                    100 * statistics.median(wait_fractions),
                )
        return {"perf/slowest_rank": float(rank), "perf/slowest_ratio": ratios[rank]}

    def describe(self) -> str:
        """The last window's slowest rank, for the log; empty with one rank or before a window."""
        if self.slowest is None:
            return ""
        rank, ratio = self.slowest
        return f"slowest rank {rank} on {self.hosts[rank]}, {ratio:.2f}x the others' median"
