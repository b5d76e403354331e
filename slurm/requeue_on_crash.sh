# Sourced by slurm/*.sbatch: run_tasks runs the job's tasks and requeues the job after a crash during training.
#
# SLURM requeues a --requeue job by itself only when a node fails; a job whose tasks crashed (an error, the OOM
# killer, the hang watchdog's exit) simply ends FAILED. run_tasks requeues it, up to MAX_CRASH_RESTARTS times
# (default 3; sbatch --export=ALL,MAX_CRASH_RESTARTS=5 ...), counted in the job's Comment: requeues after a
# preemption, a time limit or a node failure do not count. The requeued job resumes from its newest checkpoint
# (ckpt_path=auto). A failure before the first training step (a config error, a missing dataset) is not
# requeued, nor is a run that stopped on a signal (it saved a checkpoint and requeued itself, or was told to end)
# or diverged (a restart would diverge again): see runs/restart_marker.py.
MAX_CRASH_RESTARTS=${MAX_CRASH_RESTARTS:-3}
CRASH_COMMENT=imagenet-pipeline-crash-restarts

crash_restarts() {
  scontrol show job -o "$SLURM_JOB_ID" | sed -n "s/.*Comment=$CRASH_COMMENT:\([0-9]*\).*/\1/p"
}

run_tasks() {
  export IMAGENET_PIPELINE_PROGRESS_FILE="${TMPDIR:-/tmp}/imagenet-pipeline-${SLURM_JOB_ID}.trained"
  rm -f "$IMAGENET_PIPELINE_PROGRESS_FILE"
  local status=0 restarts
  "$@" || status=$?
  [ "$status" = 0 ] && return 0
  if [ ! -e "$IMAGENET_PIPELINE_PROGRESS_FILE" ]; then  # (srun's exit status cannot tell these apart)
    echo "$(date -Is) job $SLURM_JOB_ID: tasks ended with exit $status before training began, on a signal they" \
      "saved a checkpoint for, or on an error a restart would repeat: not requeued by this script" >&2
    return "$status"
  fi
  rm -f "$IMAGENET_PIPELINE_PROGRESS_FILE"
  restarts=$(crash_restarts || true)
  restarts=${restarts:-0}
  if [ "$restarts" -ge "$MAX_CRASH_RESTARTS" ]; then
    echo "$(date -Is) job $SLURM_JOB_ID: tasks failed (exit $status) after $restarts automatic restarts, the cap" \
      "(MAX_CRASH_RESTARTS=$MAX_CRASH_RESTARTS): not requeued. Resubmit with run_id=$SLURM_JOB_ID to continue" \
      "from the newest checkpoint" >&2
    return "$status"
  fi
  scontrol update JobId="$SLURM_JOB_ID" Comment="$CRASH_COMMENT:$((restarts + 1))"
  echo "$(date -Is) job $SLURM_JOB_ID: tasks failed (exit $status) during training: requeued (automatic restart" \
    "$((restarts + 1)) of $MAX_CRASH_RESTARTS); it resumes from the newest checkpoint" >&2
  scontrol requeue "$SLURM_JOB_ID"
  return "$status"
}
