#!/usr/bin/env bash
# The tests' own SLURM cluster: slurmctld + slurmd + munge on 127.0.0.1, one node with this machine's CPUs and memory.
#
#   bash tests/slurm/cluster.sh up      # installs Debian's slurm and munge if missing, starts, waits for 'idle'
#   bash tests/slurm/cluster.sh down    # stops what 'up' started, by PID
#
# Needs root and apt (Debian 12). No systemd: the daemons run in the foreground (-D) as background jobs, their PIDs
# in $SLURM_CLUSTER_DIR/*.pid. Recipe: ../shared/notes/slurm-on-loopback.md. State and logs: $SLURM_CLUSTER_DIR.
set -euo pipefail
BASE=${SLURM_CLUSTER_DIR:-/tmp/imagenet-pipeline-slurm}
DAEMONS=(slurmd slurmctld munged)

down() {
  local jobs
  jobs=$(squeue -h -o %i 2>/dev/null || true)
  if [ -n "$jobs" ]; then
    scancel $jobs || true
    for _ in $(seq 100); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
  for daemon in "${DAEMONS[@]}"; do
    local pidfile="$BASE/$daemon.pid" pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
      echo "stopped $daemon ($pid)"
    fi
    rm -f "$pidfile"
  done
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null && return
  [ "$(id -u)" = 0 ] || { echo "SLURM is not installed and installing it needs root" >&2; exit 3; }
  command -v apt-get >/dev/null || { echo "SLURM is not installed and there is no apt-get to install it" >&2; exit 3; }
  echo "installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$BASE/log/apt.log" 2>&1
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >>"$BASE/log/apt.log" 2>&1 \
    || { tail -20 "$BASE/log/apt.log" >&2; exit 3; }
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge && mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge /etc/munge/munge.key && chmod 0700 /etc/munge && chmod 0600 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  # setpriv execs munged, so $! is munged itself
  setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
    </dev/null >"$BASE/log/munged.out" 2>&1 &
  echo $! >"$BASE/munged.pid"
  for _ in $(seq 100); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged did not come up: $(cat "$BASE/log/munged.out")" >&2; exit 1
}

write_config() {
  local node=$1 hw
  hw=$(slurmd -C | head -1)
  get() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  mkdir -p /etc/slurm
  cat >/etc/slurm/slurm.conf <<EOF
# Written by tests/slurm/cluster.sh: a one-node test cluster on loopback.
ClusterName=imagenet-pipeline-tests
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it starts again (default 120 s)
AuthInfo=cred_expire=5
StateSaveLocation=$BASE/state/ctld
SlurmdSpoolDir=$BASE/state/d
SlurmctldPidFile=$BASE/state/slurmctld.pid
SlurmdPidFile=$BASE/state/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
ProctrackType=proctrack/linuxproc
# tasks bound to their cores (sched_setaffinity, no cgroups), as a site that binds to cores does: a step's task gets
# its --cpus-per-task cores, and 1 where srun is not given the option (SLURM 22.05-23.02 do not pass sbatch's on)
TaskPlugin=task/affinity
TaskPluginParam=Cores
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
# time between SIGTERM and SIGKILL: a job saves its checkpoint in it
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$node NodeAddr=127.0.0.1 CPUs=$(get CPUs) Boards=1 SocketsPerBoard=$(get SocketsPerBoard) CoresPerSocket=$(get CoresPerSocket) ThreadsPerCore=$(get ThreadsPerCore) RealMemory=$(( $(get RealMemory) * 9 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  down >/dev/null 2>&1 || true
  rm -rf "$BASE/state" "$BASE/log"
  mkdir -p "$BASE/state/ctld" "$BASE/state/d" "$BASE/log"
  install_packages
  start_munge
  local node
  node=$(hostname -s)
  write_config "$node"
  # -c: no job state from an earlier cluster
  /usr/sbin/slurmctld -D -c </dev/null >"$BASE/log/slurmctld.out" 2>&1 &
  echo $! >"$BASE/slurmctld.pid"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  /usr/sbin/slurmd -D -N "$node" </dev/null >"$BASE/log/slurmd.out" 2>&1 &
  echo $! >"$BASE/slurmd.pid"
  for _ in $(seq 150); do [ "$(sinfo -h -n "$node" -o %T 2>/dev/null | sort -u)" = idle ] && break; sleep 0.2; done
  if [ "$(sinfo -h -n "$node" -o %T | sort -u)" != idle ]; then
    echo "node $node is not idle:" >&2; sinfo >&2; tail -20 "$BASE"/log/*.log >&2; down; exit 1
  fi
  sinfo
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
