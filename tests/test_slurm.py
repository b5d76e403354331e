"""SLURM: the sbatch templates on one node and across two, preemption and requeue, submitit sweeps, on a real
two-node cluster (slurm marker; tests/slurm_jobs.py); the job-layout checks and the sweep summary without one."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from report import report
from slurm.environment import SlurmJob, SlurmLayoutError
from sweeps.summary import COLUMNS, format_summary, write_summary
from tests.conftest import PROJECT_ROOT, SMALL_RUN
from tests.slurm_jobs import (
    JOB_RUN,
    LOOPBACK_RENDEZVOUS,
    STEPS_PER_EPOCH,
    job_field,
    job_nodes,
    job_run,
    last_val_row,
    node_address,
    sbatch,
    steps_of,
    template_job,
    wait_for_job,
    wait_for_lines,
)
from tests.test_dashboards import assert_plots, wandb_records


@pytest.mark.slurm
@pytest.mark.parametrize("template", ["single_node.sbatch", "multi_node.sbatch"])
def test_sbatch_template_trains_with_ddp_over_two_tasks(cluster, tmp_path: Path, template: str):
    job = template_job(cluster, tmp_path, template, "trainer.max_epochs=2")
    state = wait_for_job(job, timeout=300)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    assert "SLURM_PROCID=0 of 2" in log and "SLURM_PROCID=1 of 2" in log
    # every rank's banner, each task bound to a core of its own (--cpus-per-task=1), no warning
    cores = [re.search(rf"rank {rank} cores it may run on: (\d+) \(1\)", log) for rank in (0, 1)]
    assert all(cores) and cores[0][1] != cores[1][1], log[:4000]
    assert "rank 1 of 2 (local rank 1 of 2)" in log and "[callbacks.rank_banner][WARNING]" not in log
    assert "step 6/6" in log and "v_num" not in log  # the progress lines of a log file
    assert "global batch 40" in log  # 20 per device x 2 tasks, logged with the scaled learning rate
    run = tmp_path / "outputs" / "train" / job  # the run folder is keyed by the job id
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["version_0"]  # one metrics log: rank zero's
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and len(checkpoints) == 3  # last + the 2 epochs (top-3)
    assert steps_of(run / "checkpoints" / "last.ckpt") == (2 * STEPS_PER_EPOCH, 1)  # (global step, last epoch)
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(last_val_row(run))


@pytest.mark.slurm
def test_multi_node_template_trains_across_two_hosts_whose_ranks_agree(cluster, tmp_path: Path):
    """2 nodes x 1 task: rank 0 on node1, rank 1 on node2, each node a host of its own (network and hostname);
    the rendezvous is node1's address, and both ranks end at the same step with the same validation figures."""
    observer = tmp_path / "ranks"
    job = template_job(
        cluster, tmp_path, "multi_node.sbatch", "trainer.max_epochs=2",
        "+callbacks.rank_metrics._target_=tests.observers.RankMetrics", f"+callbacks.rank_metrics.folder={observer}",
        nodes=2, tasks=1,
    )  # fmt: skip
    state = wait_for_job(job, timeout=300)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    assert job_nodes(job) == ["node1", "node2"]
    assert f"2 node(s) x 1 task(s) x 1 core(s) on node[1-2], rendezvous {node_address('node1')}:" in log, log[:2000]
    assert "rank 0 of 2 (local rank 0 of 1) on node1" in log and "rank 1 of 2 (local rank 0 of 1) on node2" in log
    ranks = [json.loads((observer / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert [rank["global_step"] for rank in ranks] == [2 * STEPS_PER_EPOCH] * 2
    figures = [{name: rank["metrics"][name] for name in ("val/acc1", "val/acc5", "val/loss")} for rank in ranks]
    assert figures[0] == figures[1]


def srun_takes_cpus_per_task_from_sbatch() -> bool:
    """Not in SLURM 22.05 to 23.02 (srun(1): "not automatically inherited by srun"); before and after, it does."""
    version = subprocess.run(["sbatch", "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = map(int, re.search(r"(\d+)\.(\d+)", version).groups())
    return not (22, 5) <= (major, minor) < (23, 11)


@pytest.mark.slurm
def test_a_task_gets_the_cores_of_cpus_per_task_and_its_log_says_so(cluster, tmp_path: Path):
    """A 1-task job with --cpus-per-task=2, its tasks bound to cores (the harness's task/affinity): from the
    template the task may run on 2 cores; from a plain ``srun`` it gets 1 under SLURM 22.05 to 23.02, and its
    banner warns of it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores")
    template = template_job(cluster, tmp_path, "single_node.sbatch", "trainer.max_epochs=1", tasks=1, cores=2)
    command = " ".join([sys.executable, "train.py", "trainer=slurm", *job_run(tmp_path), "trainer.max_epochs=1"])
    plain = sbatch({**cluster, **LOOPBACK_RENDEZVOUS}, tmp_path, "--job-name=plain-srun", "--ntasks=1",
                   "--cpus-per-task=2", "--time=15", f"--wrap=srun {command}")  # fmt: skip
    logs = {}
    for job in (template, plain):
        state = wait_for_job(job, timeout=300)
        logs[job] = next(tmp_path.glob(f"*-{job}.out")).read_text()
        assert state == "COMPLETED", logs[job][-4000:]
        assert "rank 0 SLURM: " in logs[job] and "SLURM_CPUS_PER_TASK=2" in logs[job]
    assert re.search(r"rank 0 cores it may run on: \d+-\d+ \(2\)", logs[template]), logs[template][:4000]
    assert "x 1 task(s) x 2 core(s)" in logs[template]  # the batch script's line
    assert "[callbacks.rank_banner][WARNING]" not in logs[template]
    if srun_takes_cpus_per_task_from_sbatch():
        assert re.search(r"rank 0 cores it may run on: \d+-\d+ \(2\)", logs[plain]), logs[plain][:4000]
    else:
        assert re.search(r"rank 0 cores it may run on: \d+ \(1\)", logs[plain]), logs[plain][:4000]
        assert "rank 0 may run on 1 core(s) but the job gives each task 2 (SLURM_CPUS_PER_TASK)" in logs[plain]


@pytest.mark.slurm
def test_signalled_job_saves_requeues_and_resumes_in_mid_epoch(cluster, tmp_path: Path):
    """USR1 in epoch 1 (as sbatch --signal or a preemption sends it): the job saves, requeues itself, and its
    second run resumes from that checkpoint, with DALI's reader state, to the same end as an uninterrupted run."""
    steps = tmp_path / "steps"
    epochs = 3
    job = template_job(
        cluster,
        tmp_path,
        "single_node.sbatch",
        f"trainer.max_epochs={epochs}",
        "data/loader=dali",
        "+callbacks.steps._target_=tests.observers.StepLog",
        f"+callbacks.steps.folder={steps}",
        "logger=[csv,wandb]",
        "logger.wandb.mode=offline",
    )
    wait_for_lines(steps / "rank0.log", 2, timeout=240)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # every task of the job's steps
    state = wait_for_job(job, timeout=400)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "COMPLETED" and job_field(job, "Restarts") == "1", log[-4000:]
    assert "restart 1): SLURM_PROCID=0" in log and "restart 1): SLURM_PROCID=1" in log
    run = tmp_path / "outputs" / "train" / job
    saved_step, saved_epoch = steps_of(run / "hpc_ckpt_1.ckpt")
    assert saved_step % STEPS_PER_EPOCH and saved_epoch < epochs - 1  # saved in mid-epoch, before the last one
    assert f"Restoring states from the checkpoint path at {run / 'hpc_ckpt_1.ckpt'}" in log
    assert steps_of(run / "checkpoints" / "last.ckpt") == (epochs * STEPS_PER_EPOCH, epochs - 1)
    first, second = ([r["run"] for r in records if r["type"] == "run"][0] for records in wandb_records(run))
    assert first["run_id"] == second["run_id"] and second["resume"]  # the requeued job continues the W&B run
    for rank in (0, 1):
        trained = [tuple(map(int, line.split())) for line in (steps / f"rank{rank}.log").read_text().splitlines()]
        # every step once, none twice: up to the saved one in the first run, the rest in the second
        assert trained == [(step, int(step > saved_step)) for step in range(1, epochs * STEPS_PER_EPOCH + 1)]


@pytest.mark.slurm
def test_scancel_saves_a_checkpoint_before_the_job_ends(cluster, tmp_path: Path):
    steps = tmp_path / "steps"
    job = template_job(
        cluster,
        tmp_path,
        "single_node.sbatch",
        "trainer.max_epochs=20",
        "+callbacks.steps._target_=tests.observers.StepLog",
        f"+callbacks.steps.folder={steps}",
        tasks=1,
    )
    wait_for_lines(steps / "rank0.log", 2, timeout=240)
    subprocess.run(["scancel", job], check=True)  # SIGTERM to every process, SIGKILL after KillWait
    assert wait_for_job(job, timeout=120) == "CANCELLED"
    run = tmp_path / "outputs" / "train" / job
    step, _ = steps_of(run / "hpc_ckpt_1.ckpt")
    assert 2 <= step < 20 * 2 * STEPS_PER_EPOCH
    assert "Stopping; resume with ckpt_path=" in next(tmp_path.glob(f"*-{job}.out")).read_text()


@pytest.mark.slurm
def test_job_with_more_tasks_than_devices_fails_naming_the_sbatch_option(cluster, tmp_path: Path):
    job = template_job(cluster, tmp_path, "single_node.sbatch", "trainer.devices=1")
    assert wait_for_job(job, timeout=180) == "FAILED"
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert "runs 2 task(s) per node (sbatch --ntasks-per-node=2) but trainer.devices=1" in log
    assert "submit with --ntasks-per-node=1" in log


def run_sweep(
    tmp_path: Path, env: dict[str, str], *launcher: str, while_running: Callable[[Path], None] | None = None
) -> tuple[Path, list[str]]:
    """``python train.py -m ... optimizer.lr=0.1,0.2``: 2 jobs of one epoch, each logging its steps in its folder.
    Checks that both ended done with a checkpoint, a summary row and a W&B run in the sweep's group; returns the
    sweep folder and each summary row's job, state and restarts."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        "train.py",
        "-m",
        *launcher,
        f"hydra.sweep.dir={sweep}",
        *JOB_RUN,
        f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=1",
        "+callbacks.steps._target_=tests.observers.StepLog",
        "+callbacks.steps.folder=${hydra:runtime.output_dir}/steps",
        "logger=[csv,wandb]",
        "logger.wandb.mode=offline",
        "optimizer.lr=0.1,0.2",
    ]
    with open(tmp_path / "sweep.out", "w") as out, open(tmp_path / "sweep.err", "w") as err:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=err, text=True)
        if while_running:
            while_running(sweep)
        assert process.wait(timeout=600) == 0, (tmp_path / "sweep.err").read_text()[-4000:]
    for job in ("0", "1"):
        assert json.loads((sweep / job / "job.json").read_text())["state"] == "done"
        assert (sweep / job / "checkpoints" / "last.ckpt").exists()
    with open(sweep / "summary.csv", newline="") as file:
        summary = list(csv.DictReader(file))
    assert tuple(summary[0]) == COLUMNS
    assert [row["overrides"].split()[-1] for row in summary] == ["optimizer.lr=0.1", "optimizer.lr=0.2"]
    for job, row in zip(("0", "1"), summary):  # each job's own final figures, as its CSV log has them
        logged = last_val_row(sweep / job)
        for key in ("val/acc1", "val/acc5"):
            assert float(row[key]) == pytest.approx(logged[key]), (job, key)
    assert "optimizer.lr=0.2" in (tmp_path / "sweep.out").read_text()  # the table printed at the end
    runs = {job: [r["run"] for r in wandb_records(sweep / job)[-1] if r["type"] == "run"][0] for job in ("0", "1")}
    assert runs["0"]["run_group"] == runs["1"]["run_group"] == "sweep"  # one W&B group per sweep: its folder's name
    assert runs["0"]["run_id"] != runs["1"]["run_id"] and runs["0"]["display_name"] == "sweep/0"
    assert_plots(report(sweep, tmp_path / "report"))  # one curve per job
    return sweep, [[row["job"], row["state"], row["restarts"]] for row in summary]


@pytest.mark.slurm
def test_submitit_sweep_on_slurm_runs_two_jobs_and_requeues_one(cluster, tmp_path: Path):
    """A 2-job array through hydra/launcher=slurm; job 0, signalled in mid-epoch, requeues and resumes like an
    sbatch job (the preset's --signal=USR1 reaches callbacks.mid_epoch_checkpoint, not submitit's handler)."""

    def signal_job_0(sweep: Path) -> None:
        wait_for_lines(sweep / "0" / "steps" / "rank0.log", 2, timeout=300)
        array_task = next(j for j in subprocess.check_output(["squeue", "-h", "-o", "%i"], text=True).split())
        array_task = f"{array_task.split('_')[0]}_0"
        subprocess.run(["scancel", "--signal=USR1", array_task], check=True)

    launcher = ["hydra/launcher=slurm", "trainer=slurm", "hydra.launcher.timeout_min=15"]
    resources = ["hydra.launcher.tasks_per_node=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1"]
    env = {**cluster, **LOOPBACK_RENDEZVOUS}
    sweep, rows = run_sweep(tmp_path, env, *launcher, *resources, while_running=signal_job_0)
    assert rows == [["0", "done", "1"], ["1", "done", "0"]]
    for job in ("0", "1"):  # one job array, one array task per job
        assert json.loads((sweep / job / "job.json").read_text())["slurm_job_id"].endswith(f"_{job}")
    trained = [
        tuple(map(int, line.split())) for line in (sweep / "0" / "steps" / "rank0.log").read_text().split("\n") if line
    ]
    assert [step for step, _ in trained] == list(range(1, 2 * STEPS_PER_EPOCH + 1))  # each step once (1 task)
    assert trained[-1][1] == 1 and trained[0][1] == 0  # finished by the requeued run
    (script, *_) = sweep.glob(".submitit/**/*_submission.sh")  # srun gets the job's cores per task
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in script.read_text().split("srun ")[0]


@pytest.mark.slow
def test_local_submitit_sweep_runs_two_jobs_with_a_summary(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    _, rows = run_sweep(tmp_path, env, "hydra/launcher=local")
    assert rows == [["0", "done", "0"], ["1", "done", "0"]]


def test_local_multirun_refuses_ddp_subprocesses(tmp_path: Path, cache_dir: Path):
    result = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            *SMALL_RUN,
            f"paths.cache_dir={cache_dir}",
            f"hydra.sweep.dir={tmp_path}",
            "optimizer.lr=0.1,0.2",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "A Hydra multirun (-m) cannot start DDP processes itself" in result.stderr
    assert "trainer.strategy=ddp_spawn" in result.stderr
    assert not list(tmp_path.glob("*/checkpoints"))


@pytest.mark.parametrize(
    ("env", "devices", "nodes", "message"),
    [
        ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1"}, 1, 1, "submit with --ntasks-per-node=1"),
        ({"SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "1"}, 4, 2, "submit with --nodes=2"),
        ({"SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_STEP_ID": None}, 2, 1, "start it with `srun"),
    ],
)
def test_job_layout_errors_name_the_option_to_change(monkeypatch, env, devices, nodes, message):
    tasks = int(env.get("SLURM_NTASKS_PER_NODE", 2)) * int(env["SLURM_NNODES"])
    for name, value in {"SLURM_JOB_NAME": "imagenet", "SLURM_NTASKS": str(tasks), "SLURM_STEP_ID": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(SlurmLayoutError, match=message.replace("`", ".")):
        SlurmJob().validate_settings(num_devices=devices, num_nodes=nodes)


def test_job_submitted_with_ntasks_fails_at_once(monkeypatch):
    """Lightning's own check, when the environment is built: trainer=slurm reads devices from --ntasks-per-node."""
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    with pytest.raises(RuntimeError, match="Use `--ntasks-per-node=2` instead"):
        SlurmJob()


def test_slurm_trainer_outside_a_job_says_what_to_use(monkeypatch):
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    with pytest.raises(SlurmLayoutError, match="use trainer=gpu, trainer=ddp or trainer=cpu here"):
        SlurmJob()


def test_matching_job_layout_passes(monkeypatch):
    for name, value in {"SLURM_JOB_NAME": "imagenet", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    SlurmJob().validate_settings(num_devices=4, num_nodes=2)


def test_summary_states_of_done_failed_requeued_and_running_jobs(tmp_path: Path):
    for job, state in ((0, "done"), (1, "failed")):
        (tmp_path / str(job)).mkdir()
        record = {"job": job, "state": state, "restarts": job, "overrides": [f"optimizer.lr=0.{job + 1}", "seed=1"]}
        (tmp_path / str(job) / "job.json").write_text(json.dumps(record))
    (tmp_path / "0" / "metrics.json").write_text(json.dumps({"val/acc1": 0.5, "val/acc5": 0.9}))
    for job in (2, 3):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- optimizer.lr=0.{job + 1}\n- seed=1\n")
    (tmp_path / "2" / "hpc_ckpt_1.ckpt").write_bytes(b"")
    rows = write_summary(tmp_path)
    assert [(row["job"], row["state"]) for row in rows] == [(0, "done"), (1, "failed"), (2, "requeued"), (3, "running")]
    assert (tmp_path / "summary.csv").read_text().splitlines()[1].startswith("0,done,0,0.5,0.9,optimizer.lr=0.1 seed=1")
    table = format_summary(rows).splitlines()
    assert table[1].split() == ["0", "done", "0", "0.5000", "0.9000", "optimizer.lr=0.1"]  # only what differs
    assert table[3].split() == ["2", "requeued", "-", "-", "optimizer.lr=0.3"]  # no restarts recorded yet


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)], ids=["one-process", "ddp-rank0"])
def test_sigterm_saves_a_checkpoint_outside_slurm(tmp_path: Path, cache_dir: Path, devices: int):
    """A plain run (no SLURM) told to stop saves where it is and says how to resume. With 2 DDP ranks only rank 0,
    the process the user started, gets the signal: the ranks agree, stop after the same step and save it once."""
    steps = tmp_path / "steps"
    process = subprocess.Popen(
        [
            sys.executable,
            "train.py",
            *SMALL_RUN,
            *(["trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"] if devices > 1 else []),
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={tmp_path / 'run'}",
            "trainer.max_epochs=50",
            "+callbacks.steps._target_=tests.observers.StepLog",
            f"+callbacks.steps.folder={steps}",
        ],
        cwd=PROJECT_ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its ranks can be killed together if they do not stop
    )
    wait_for_lines(steps / "rank0.log", 3, timeout=240)
    process.send_signal(signal.SIGTERM)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        pytest.fail(f"still running 90 s after SIGTERM (ranks that disagree wait for each other):\n{output[-3000:]}")
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    step, _ = steps_of(tmp_path / "run" / "hpc_ckpt_1.ckpt")
    assert 3 <= step < 50 * 12
    assert f"resume with ckpt_path={tmp_path / 'run' / 'hpc_ckpt_1.ckpt'}" in output
    for rank in range(devices):  # each rank trained up to the saved step and not one step further
        trained = [int(line.split()[0]) for line in (steps / f"rank{rank}.log").read_text().splitlines()]
        assert trained == list(range(1, step + 1)), (rank, output[-3000:])
