"""ckpt_path=auto: a run started again in its folder continues from the newest complete checkpoint, whatever ended
the earlier one (a kill -9, a truncated file); time-based checkpoints and their retention; a diverged run stops."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.spec import ConfigError
from runs.checkpoints import HPC, LAST, TIMED, TOP_K, checkpoint_files, prune
from runs.resume import SUPERSEDED, ResumeError, resume_from

from .conftest import PROJECT_ROOT, SMALL_RUN

STEPS_PER_EPOCH = 12  # the small demo: 240 train images, 20 per batch
MID_EPOCH = "callbacks.mid_epoch_checkpoint"


def _save(path: Path, step: int, epoch: int = 0) -> Path:
    """A file in the format Lightning writes (torch's zip), with the two fields resume reads and a tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "epoch": epoch, "state_dict": {"w": torch.randn(64, 64)}}, path)
    return path


def _run_folder(run: Path) -> dict[str, Path]:
    return {
        "hpc": _save(run / "hpc_ckpt_1.ckpt", 10),
        "top_k": _save(run / "checkpoints" / "epoch000-top1_0.5000.ckpt", 12),
        "last": _save(run / "checkpoints" / "last.ckpt", 12),
        "timed": _save(run / "checkpoints" / "timed-step000000015.ckpt", 15, 1),
    }


def test_auto_takes_the_newest_checkpoint_of_any_kind_by_global_step(tmp_path: Path, caplog):
    files = _run_folder(tmp_path)
    (tmp_path / "checkpoints" / ".last.ckpt.x1y2.partial").write_bytes(b"half a write")  # staged, not a checkpoint
    assert {(c.path.name, c.kind) for c in checkpoint_files(tmp_path)} == {
        ("hpc_ckpt_1.ckpt", HPC), ("epoch000-top1_0.5000.ckpt", TOP_K), ("last.ckpt", LAST),
        ("timed-step000000015.ckpt", TIMED),
    }  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert resume_from("auto", tmp_path, global_rank=0) == str(files["timed"])
    assert f"Resuming from {files['timed']} (time-based, global step 15, epoch 1)" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty"])
def test_a_newest_checkpoint_that_does_not_load_is_named_and_the_next_newest_used(tmp_path: Path, caplog, damage):
    files = _run_folder(tmp_path)
    data = files["timed"].read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":  # inside the tensor's bytes: torch.load itself would not notice
        data = data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :]
    else:
        data = b""
    files["timed"].write_bytes(data)
    with caplog.at_level(logging.INFO):
        chosen = resume_from("auto", tmp_path, global_rank=0)
    assert chosen in (str(files["last"]), str(files["top_k"]))  # step 12, the next newest
    assert f"Checkpoint {files['timed']} does not load" in caplog.text
    assert "global step 12" in caplog.text


def test_a_folder_where_no_checkpoint_loads_is_an_error_naming_each(tmp_path: Path):
    files = _run_folder(tmp_path)
    for path in files.values():
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ResumeError, match="None of the 4 checkpoints") as error:
        resume_from("auto", tmp_path, global_rank=0)
    assert all(str(path) in str(error.value) for path in files.values())
    assert "ckpt_path=fresh" in str(error.value)


def test_an_empty_folder_starts_fresh_with_auto_and_is_an_error_with_last(tmp_path: Path):
    assert resume_from("auto", tmp_path, global_rank=0) is None
    with pytest.raises(ResumeError, match="holds no checkpoint"):
        resume_from("last", tmp_path, global_rank=0)
    with pytest.raises(ConfigError, match="ckpt_path=None is not allowed: auto"):
        resume_from(None, tmp_path, global_rank=0)


def test_fresh_moves_the_earlier_checkpoints_aside_intact(tmp_path: Path):
    files = _run_folder(tmp_path)
    contents = {name: path.read_bytes() for name, path in files.items()}
    assert resume_from("fresh", tmp_path, global_rank=0) is None
    assert checkpoint_files(tmp_path) == []
    (archive,) = (tmp_path / SUPERSEDED).iterdir()
    for name, path in files.items():
        assert (archive / path.relative_to(tmp_path)).read_bytes() == contents[name]


def test_another_runs_checkpoint_is_refused_where_this_folder_has_its_own(tmp_path: Path):
    other = _save(tmp_path / "other" / "checkpoints" / "last.ckpt", 7)
    assert resume_from(str(other), tmp_path / "empty", global_rank=0) == str(other)  # nothing to mix with
    _run_folder(tmp_path / "run")
    with pytest.raises(ResumeError, match="another run's checkpoint.*their top-k files would mix.*run_id="):
        resume_from(str(other), tmp_path / "run", global_rank=0)
    own = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert resume_from(str(own), tmp_path / "run", global_rank=0) == str(own)
    copied = tmp_path / "elsewhere.ckpt"  # this run's checkpoint kept elsewhere: its ModelCheckpoint wrote here
    written_by = {"ModelCheckpoint{...}": {"dirpath": str(own.parent)}}
    torch.save({"global_step": 3, "epoch": 0, "callbacks": written_by}, copied)
    assert resume_from(str(copied), tmp_path / "run", global_rank=0) == str(copied)


def test_retention_keeps_the_newest_time_based_and_preemption_checkpoints(tmp_path: Path):
    for step in (5, 10, 15, 20):
        _save(tmp_path / "checkpoints" / f"timed-step{step:09d}.ckpt", step)
    for number in (1, 2):
        _save(tmp_path / f"hpc_ckpt_{number}.ckpt", 3 * number)
    _save(tmp_path / "checkpoints" / "last.ckpt", 12)
    removed = prune(tmp_path, keep_time_based=2)
    assert sorted(p.name for p in removed) == [
        "hpc_ckpt_1.ckpt", "timed-step000000005.ckpt", "timed-step000000010.ckpt",
    ]  # fmt: skip
    assert sorted(c.path.name for c in checkpoint_files(tmp_path)) == [
        "hpc_ckpt_2.ckpt", "last.ckpt", "timed-step000000015.ckpt", "timed-step000000020.ckpt",
    ]  # fmt: skip


def _train_command(run: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "train.py", *SMALL_RUN, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run}", *overrides,
    ]  # fmt: skip


def _run(command: list[str], env: dict[str, str]) -> str:
    """Runs train.py to its end; returns its output (the log and Lightning's lines)."""
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def _steps(run: Path) -> list[int]:
    return [int(line.split()[0]) for line in (run.parent / "steps" / "rank0.log").read_text().splitlines()]


@pytest.mark.slow
def test_a_killed_run_started_again_resumes_from_its_newest_checkpoint(tmp_path: Path, cache_dir: Path):
    """kill -9 in mid-epoch (no signal the run could act on): the same command again continues from the newest
    time-based checkpoint, trains every step after it once, and ends with the weights of an uninterrupted run. Then
    a truncated last.ckpt: the next run names it and continues from the top-k file of the same step."""
    run = tmp_path / "run"
    observe = ["+callbacks.steps._target_=tests.observers.StepLog", f"+callbacks.steps.folder={tmp_path / 'steps'}"]
    often = [f"{MID_EPOCH}.every_minutes=0.005", f"{MID_EPOCH}.check_every_n_steps=2"]
    command = _train_command(run, cache_dir, "trainer.max_epochs=2", *often, *observe)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while max((c.order for c in checkpoint_files(run) if c.kind == TIMED), default=0) < STEPS_PER_EPOCH // 2:
        assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    first_log = (tmp_path / "first.log").read_text()
    assert "Checkpoints: about" in first_log and "at most 7 (top-3, last, time-based every 0.005 min" in first_log
    timed = [c for c in checkpoint_files(run) if c.kind == TIMED]
    assert 1 <= len(timed) <= 2, timed  # retention: the newest 2
    saved = max(int(torch.load(c.path, weights_only=True)["global_step"]) for c in timed)
    trained_before = len(_steps(run))
    assert STEPS_PER_EPOCH // 2 <= saved < 2 * STEPS_PER_EPOCH and trained_before >= saved

    second = _run(command, env)
    assert f"(time-based, global step {saved}," in second
    assert _steps(run)[trained_before:] == list(range(saved + 1, 2 * STEPS_PER_EPOCH + 1))  # each step after it once

    straight = tmp_path / "straight"
    no_timed = [f"{MID_EPOCH}.every_minutes=null"]
    _run(_train_command(straight, cache_dir, "trainer.max_epochs=2", *no_timed), env)
    resumed, reference = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (run, straight))
    assert resumed["global_step"] == reference["global_step"] == 2 * STEPS_PER_EPOCH
    for name, tensor in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], tensor), name

    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:4096])  # cut short, as a full disk or a killed copy leaves it
    third = _run(_train_command(run, cache_dir, "trainer.max_epochs=3", *no_timed), env)
    assert f"Checkpoint {last} does not load" in third
    assert "(top-k, global step 24, epoch 1)" in third
    assert torch.load(last, weights_only=True)["global_step"] == 3 * STEPS_PER_EPOCH


def test_a_non_finite_loss_stops_the_run_naming_the_step_before_it_is_saved(tmp_path: Path, cache_dir: Path):
    run = tmp_path / "run"
    poison = ["+callbacks.poison._target_=tests.observers.PoisonWeights", "+callbacks.poison.step=4"]
    often = [f"{MID_EPOCH}.every_minutes=0.0001", f"{MID_EPOCH}.check_every_n_steps=1"]
    result = subprocess.run(_train_command(run, cache_dir, "trainer.max_epochs=1", *often, *poison),
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert "NonFiniteLoss: the training loss is nan on rank 0 at global step 5 (epoch 0" in result.stderr
    steps = [int(torch.load(c.path, weights_only=True)["global_step"]) for c in checkpoint_files(run)]
    assert steps and max(steps) == 4  # saved up to the last finite step, never after


def test_a_request_due_at_an_epochs_last_batch_is_saved_at_the_epochs_end(tmp_path: Path, cache_dir: Path):
    """Lightning 2.6.6 resumes a checkpoint taken after an epoch's last batch as if one more epoch had ended; the
    time-based one due there is taken at the epoch's end instead (where ModelCheckpoint saves last.ckpt next), and a
    run resumed from it (as after a crash between the two saves) trains every remaining epoch."""
    run = tmp_path / "run"
    due_every_6 = [f"{MID_EPOCH}.every_minutes=0.0001", f"{MID_EPOCH}.check_every_n_steps=6"]  # 12 steps per epoch
    _run(_train_command(run, cache_dir, "trainer.max_epochs=1", *due_every_6), os.environ.copy())
    for checkpoint in checkpoint_files(run):
        if checkpoint.kind != TIMED:
            checkpoint.path.unlink()
    output = _run(_train_command(run, cache_dir, "trainer.max_epochs=2"), os.environ.copy())
    assert "(time-based, global step 12, epoch 0)" in output
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH


def test_last_ckpt_is_the_end_of_every_epoch_whatever_the_top_k_saves(tmp_path: Path, cache_dir: Path):
    """Lightning 2.6's save_last writes last.ckpt only with a top-k file: with top-1 by a val top-1 that stops
    improving, it would lag behind; callbacks.last_checkpoint writes it at every epoch's end."""
    run = tmp_path / "run"
    few = ["data.root.train_per_class=10", "callbacks.model_checkpoint.save_top_k=1", "trainer.max_epochs=5"]
    _run(_train_command(run, cache_dir, *few), os.environ.copy())
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (state["global_step"], state["epoch"]) == (5 * 2, 4)  # 40 images, 20 per batch
    assert sorted(c.kind for c in checkpoint_files(run)) == [LAST, TOP_K]
