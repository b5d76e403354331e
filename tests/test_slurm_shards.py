"""SLURM: a 2-task job trains from a shard set through DALI, is signalled in mid-epoch, requeues, and resumes with
each sample of the interrupted epoch trained once (slurm marker; the session's cluster, tests/slurm_jobs.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.slurm_jobs import STEPS_PER_EPOCH, job_field, steps_of, template_job, wait_for_job, wait_for_lines

TRAIN_IMAGES = 240  # unique_label_shards: one image per class, in 5 shards; 2 ranks x 6 steps x 20 an epoch


def _trained(log: Path) -> list[tuple[int, int, list[int]]]:
    """(step, restart, the batch's labels) per line of a ``SampleLog`` file."""
    lines = [line.split() for line in log.read_text().splitlines()]
    return [(int(step), int(restart), [int(label) for label in labels]) for step, restart, *labels in lines]


@pytest.mark.slurm
def test_a_signalled_job_resumes_from_shards_with_each_sample_once_in_its_epoch(
    cluster, tmp_path: Path, unique_label_shards: Path
):
    samples, epochs = tmp_path / "samples", 3
    job = template_job(
        cluster,
        tmp_path,
        "single_node.sbatch",
        f"data.root={unique_label_shards}",
        "data/loader=dali",
        f"trainer.max_epochs={epochs}",
        "+callbacks.samples._target_=tests.observers.SampleLog",
        f"+callbacks.samples.folder={samples}",
    )
    wait_for_lines(samples / "rank0.log", STEPS_PER_EPOCH + 2, timeout=300)  # into epoch 1
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_for_job(job, timeout=400)
    log = next(tmp_path.glob(f"*-{job}.out")).read_text()
    assert state == "COMPLETED" and job_field(job, "Restarts") == "1", log[-4000:]
    assert f"Dataset {unique_label_shards} (shards): 240 classes, {TRAIN_IMAGES} train images in 5 shards" in log
    run = tmp_path / "outputs" / "train" / job
    saved_step, _ = steps_of(run / "hpc_ckpt_1.ckpt")
    assert saved_step % STEPS_PER_EPOCH, f"saved at step {saved_step}, an epoch's end: not a mid-epoch resume"
    ranks = [_trained(samples / f"rank{rank}.log") for rank in (0, 1)]
    for trained in ranks:  # every step once: up to the saved one before the requeue, the rest after it
        assert [(step, restart) for step, restart, _ in trained] == [
            (step, int(step > saved_step)) for step in range(1, epochs * STEPS_PER_EPOCH + 1)
        ]
    for epoch in range(epochs):
        steps = range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
        seen = [label for trained in ranks for step, _, batch in trained if step in steps for label in batch]
        assert sorted(seen) == list(range(TRAIN_IMAGES)), f"epoch {epoch}: a sample trained twice or never"
