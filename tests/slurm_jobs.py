"""Jobs on the tests' two-node SLURM cluster (tests/slurm/cluster.sh): the session's ``cluster`` fixture, submitting
the project's sbatch templates, waiting for jobs, and losing a node. Shared by every test module that submits jobs."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.conftest import PROJECT_ROOT, SMALL_RUN

HARNESS = PROJECT_ROOT / "tests" / "slurm" / "cluster.sh"
NODE_INTERFACE = "eth0"  # the harness's name for each node's interface on the cluster's network
STEPS_PER_EPOCH = 6  # the small demo: 240 train images / 2 ranks / 20 per batch
# For a one-node job that does not source slurm/job_env.sh (a plain srun, a submitit sweep): Lightning's rendezvous
# is then the node's name, which does not resolve on the harness; loopback is the node's own address too.
LOOPBACK_RENDEZVOUS = {"MASTER_ADDR": "127.0.0.1"}
JOB_RUN = [
    *(o for o in SMALL_RUN if not o.startswith("trainer.enable_progress_bar")),
    "trainer.precision=32-true",
]


def _harness_unavailable() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the SLURM harness runs daemons and network namespaces as root"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "SLURM is not installed and there is no apt-get to install it"
    if not shutil.which("ip"):
        return "the SLURM harness needs iproute2 (ip) for its nodes' namespaces"
    return None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One SLURM cluster for the test session, node1 and node2, each in namespaces of its own; yields the environment
    jobs are submitted with. The project's Python is first on PATH; the rendezvous is the jobs' own (slurm/job_env.sh
    takes the first node's address), and gloo is told the nodes' interface: it would fall back to loopback, since
    the nodes' names do not resolve."""
    reason = _harness_unavailable()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env["SLURM_CLUSTER_DIR"] = str(tmp_path_factory.mktemp("slurm-cluster"))
    up = subprocess.run(["bash", str(HARNESS), "up"], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode == 3:  # cannot install
        pytest.skip(up.stderr.strip())
    assert up.returncode == 0, up.stdout + up.stderr
    yield {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        "PYTHON": sys.executable,
        "GLOO_SOCKET_IFNAME": NODE_INTERFACE,
    }
    subprocess.run(["bash", str(HARNESS), "down"], env=env, capture_output=True, timeout=120)


def _harness(env: dict[str, str], *verb: str) -> None:
    result = subprocess.run(["bash", str(HARNESS), *verb], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"cluster.sh {' '.join(verb)}:\n{result.stdout}{result.stderr}"


def kill_node(env: dict[str, str], node: str) -> None:
    """The node fails as if it lost power: its network goes, its slurmd and every task on it get SIGKILL. SLURM
    marks it DOWN after SlurmdTimeout (10 s) and some more, up to about 30 s."""
    _harness(env, "kill-node", node)


def start_node(env: dict[str, str], node: str) -> None:
    """The node comes back; returns once its slurmd has registered and it serves jobs again."""
    _harness(env, "start-node", node)


def node_address(node: str) -> str:
    """The node's NodeAddr: the address its jobs' rendezvous uses (the name does not resolve on the harness)."""
    shown = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True).stdout
    return next(item.split("=", 1)[1] for item in shown.split() if item.startswith("NodeAddr="))


def sbatch(env: dict[str, str], log_dir: Path, *args: str) -> str:
    """Submits from the project root as a user does; returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--output={log_dir}/%x-%j.out", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().split(";")[0]


def job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next(item.split("=", 1)[1] for item in shown.split() if item.startswith(f"{field}="))


def job_nodes(job_id: str) -> list[str]:
    """The nodes the job runs on (or last ran on), in rank order; none while it waits."""
    nodes = job_field(job_id, "NodeList")
    if nodes == "(null)":
        return []
    shown = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return shown.stdout.split()


def wait_for_job(job_id: str, timeout: float) -> str:
    """Waits until the job has left the queue (requeues included); returns its final state."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id])
            pytest.fail(f"job {job_id} still queued after {timeout} s")
        time.sleep(0.5)
    return job_field(job_id, "JobState")


def wait_for_lines(path: Path, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or len(path.read_text().splitlines()) < count:
        assert time.monotonic() < deadline, f"{path}: fewer than {count} lines after {timeout} s"
        time.sleep(0.2)


def job_run(tmp_path: Path) -> list[str]:
    """train.py's overrides in a job: the small demo, its cache and outputs under ``tmp_path``."""
    return [*JOB_RUN, f"paths.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path / 'outputs'}"]


def template_job(
    env: dict[str, str],
    tmp_path: Path,
    template: str,
    *overrides: str,
    nodes: int = 1,
    tasks: int = 2,
    cores: int = 1,
) -> str:
    """The project's sbatch template for ``nodes`` nodes of ``tasks`` CPU processes of ``cores`` cores each,
    training the small demo."""
    return sbatch(
        env,
        tmp_path,
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks}",
        "--gpus-per-node=0",
        f"--cpus-per-task={cores}",
        "--time=15",
        f"slurm/{template}",
        *job_run(tmp_path),
        *overrides,
    )


def last_val_row(run: Path) -> dict[str, float]:
    """The last validation figures of a run's CSV logs (a resumed run's are in the newest version)."""
    newest = max((run / "csv").glob("version_*"), key=lambda folder: int(folder.name.split("_")[1]))
    with open(newest / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/acc1")]
    return {key: float(rows[-1][key]) for key in ("val/loss", "val/acc1", "val/acc5")}


def steps_of(checkpoint: Path) -> tuple[int, int]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return state["global_step"], state["epoch"]
