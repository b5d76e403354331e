#!/usr/bin/env bash
# The tests' own SLURM cluster: two nodes on this machine, each its own "host". slurmctld and munged run on the host
# side; node1 and node2 each run a slurmd in a network + UTS namespace of their own (own hostname, own address
# 192.168.77.N on an interface named eth0), joined to the host by a bridge (192.168.77.254). Both nodes advertise
# this machine's CPUs and memory. The namespaces share the host's mount and PID namespaces: same files, same munge
# socket, same /tmp, and their processes are visible (and signalled) from the host.
#
#   bash tests/slurm/cluster.sh up                # installs Debian's slurm and munge if missing, starts, waits
#                                                 # until both nodes are idle
#   bash tests/slurm/cluster.sh down              # stops everything, removes the namespaces and links it made
#   bash tests/slurm/cluster.sh kill-node NODE    # the node loses power: its link goes down, its slurmd and job
#                                                 # tasks get SIGKILL (nothing reaches the other node)
#   bash tests/slurm/cluster.sh start-node NODE   # the node comes back: link up, slurmd started, waits until it serves
#   bash tests/slurm/cluster.sh exec-node NODE CMD...  # runs CMD on the node (in its namespaces)
#
# Needs root, iproute2 and apt (Debian 12). No systemd: the daemons run in the foreground (-D) as background jobs.
# Recipe: ../shared/notes/slurm-on-loopback.md. State and logs: $SLURM_CLUSTER_DIR. One such cluster per machine
# (namespaces, links, ports and /etc/slurm are the machine's), so its PIDs and the nodes' UTS namespaces are kept in
# /run/slurmtest: 'down' stops a cluster whichever $SLURM_CLUSTER_DIR it was started with.
set -euo pipefail
BASE=${SLURM_CLUSTER_DIR:-/tmp/imagenet-pipeline-slurm}
NODES=(node1 node2)
NET=192.168.77        # a private /24 on the bridge only: node N is .N, the host side (slurmctld) .254
HOST_ADDR=$NET.254
BRIDGE=slurmtest-br
RUN_DIR=/run/slurmtest
UTS_DIR=$RUN_DIR/uts  # the nodes' UTS namespaces, kept by bind mounts as `ip netns` keeps network ones
NODE_IF=eth0          # the same name on every node, so that one GLOO_SOCKET_IFNAME fits all

netns() { echo "slurmtest-$1"; }
node_addr() { echo "$NET.${1#node}"; }
is_node() { [[ " ${NODES[*]} " == *" $1 "* ]] || { echo "no node '$1' (nodes: ${NODES[*]})" >&2; exit 2; }; }
exec_in_node() {  # NODE CMD...: becomes CMD, in the node's namespaces
  local node=$1
  shift
  exec nsenter --net="/run/netns/$(netns "$node")" --uts="$UTS_DIR/$node" -- "$@"
}

stop_pid() {  # SIGTERM, then SIGKILL after 10 s
  local name=$1 pidfile="$RUN_DIR/$1.pid" pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "stopped $name ($pid)"
  fi
  rm -f "$pidfile"
}

kill_namespace() {  # SIGKILL every process in the node's network namespace, until none is left
  local ns pids
  ns=$(netns "$1")
  for _ in $(seq 50); do
    pids=$(ip netns pids "$ns" 2>/dev/null) || return 0
    [ -n "$pids" ] || return 0
    kill -9 $pids 2>/dev/null || true
    sleep 0.1
  done
  echo "processes still in $ns: $pids" >&2
  return 1
}

cancel_jobs() {
  local jobs
  jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
  [ -n "$jobs" ] || return 0
  timeout 10 scancel $jobs || true
  for _ in $(seq 100); do [ -z "$(timeout 10 squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
}

down() {
  local node
  # only our own slurmctld: without the bridge, its address would be sought beyond this machine
  if [ -f "$RUN_DIR/slurmctld.pid" ] && kill -0 "$(cat "$RUN_DIR/slurmctld.pid")" 2>/dev/null; then cancel_jobs; fi
  for node in "${NODES[@]}"; do
    stop_pid "slurmd-$node"
    kill_namespace "$node"
    ip link del "veth-$node" 2>/dev/null || true  # the pair, at once (with the namespace it would go later)
    ip netns del "$(netns "$node")" 2>/dev/null || true
    if [ -e "$UTS_DIR/$node" ]; then
      umount "$UTS_DIR/$node" 2>/dev/null || true
      rm -f "$UTS_DIR/$node"
    fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  stop_pid slurmctld
  stop_pid munged
  rmdir "$UTS_DIR" "$RUN_DIR" 2>/dev/null || true
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
  echo $! >"$RUN_DIR/munged.pid"
  for _ in $(seq 100); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged did not come up: $(cat "$BASE/log/munged.out")" >&2; exit 1
}

make_network() {  # a bridge on the host side; per node a network namespace, a veth pair into the bridge, a UTS one
  local node ns
  ip link add "$BRIDGE" type bridge
  ip link set "$BRIDGE" addrgenmode none  # no IPv6 link-local address: the /24 is the only one
  ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for node in "${NODES[@]}"; do
    ns=$(netns "$node")
    ip netns add "$ns"
    ip link add "veth-$node" type veth peer name "$NODE_IF" netns "$ns"
    ip link set "veth-$node" addrgenmode none
    ip -n "$ns" link set "$NODE_IF" addrgenmode none
    ip link set "veth-$node" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$node")/24" dev "$NODE_IF"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$NODE_IF" up
    touch "$UTS_DIR/$node"
    unshare --uts="$UTS_DIR/$node" hostname "$node"
  done
}

write_config() {
  local hw node
  hw=$(slurmd -C | head -1)
  get() { echo "$hw" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
  mkdir -p /etc/slurm
  {
    cat <<EOF
# Written by tests/slurm/cluster.sh: a two-node test cluster, each node in its own network namespace.
ClusterName=imagenet-pipeline-tests
SlurmctldHost=$(hostname -s)($HOST_ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it starts again (default 120 s)
AuthInfo=cred_expire=5
StateSaveLocation=$BASE/state/ctld
# %n: the node's name, one spool folder, pid file and log per slurmd
SlurmdSpoolDir=$BASE/state/%n
SlurmctldPidFile=$BASE/state/slurmctld.pid
SlurmdPidFile=$BASE/state/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
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
# a node that was down (a killed slurmd) serves again once its slurmd registers
ReturnToService=2
JobRequeue=1
# time between SIGTERM and SIGKILL: a job saves its checkpoint in it
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
# a node whose slurmd does not answer for 10 s is DOWN, and its jobs are requeued (--requeue) or ended
SlurmdTimeout=10
InactiveLimit=0
Waittime=0
EOF
    for node in "${NODES[@]}"; do
      echo "NodeName=$node NodeAddr=$(node_addr "$node") CPUs=$(get CPUs) Boards=1" \
        "SocketsPerBoard=$(get SocketsPerBoard) CoresPerSocket=$(get CoresPerSocket)" \
        "ThreadsPerCore=$(get ThreadsPerCore) RealMemory=$(( $(get RealMemory) * 9 / 10 )) State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >/etc/slurm/slurm.conf
}

start_slurmd() {
  local node=$1
  mkdir -p "$BASE/state/$node"
  exec_in_node "$node" /usr/sbin/slurmd -D -N "$node" </dev/null >"$BASE/log/slurmd-$node.out" 2>&1 &
  echo $! >"$RUN_DIR/slurmd-$node.pid"
}

serving() {  # SINCE NODE...: each idle or running jobs, with a slurmd that registered at SINCE or later
  local since=$1 node started
  for node in "${@:2}"; do
    [[ $(sinfo -h -n "$node" -o %T 2>/dev/null | sort -u) =~ ^(idle|mixed|allocated|completing)$ ]] || return 1
    started=$(scontrol show node "$node" | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p')
    [[ ! $started < $since ]] || return 1  # ISO times compare as strings
  done
}

wait_until_serving() {  # SINCE NODE...; on a timeout, fails with the daemons' log tails
  for _ in $(seq 150); do serving "$@" && return 0; sleep 0.2; done
  echo "node(s) ${*:2} not serving 30 s after starting:" >&2
  sinfo -N >&2 || true
  local out
  for out in "$BASE"/log/*.out; do  # each daemon's stderr: its log, and what it said before opening it
    echo "--- $out" >&2
    grep -v -i pmix "$out" | tail -n 20 >&2  # not the missing PMIx library's lines, on every start
  done
  return 1
}

up() {
  down >/dev/null 2>&1 || true
  rm -rf "$BASE/state" "$BASE/log"
  mkdir -p "$BASE/state/ctld" "$BASE/log" "$UTS_DIR"
  install_packages
  start_munge
  make_network
  write_config
  # -c: no job state from an earlier cluster
  /usr/sbin/slurmctld -D -c </dev/null >"$BASE/log/slurmctld.out" 2>&1 &
  echo $! >"$RUN_DIR/slurmctld.pid"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
  local node since
  since=$(date +%FT%T)
  for node in "${NODES[@]}"; do start_slurmd "$node"; done
  wait_until_serving "$since" "${NODES[@]}" || { down >/dev/null 2>&1 || true; exit 1; }
  sinfo -N -o "%N %T %c %m"
}

kill_node() {
  local node=$1
  # first the link, as when a node loses power: nothing in flight, no reset of a connection, reaches its peers
  ip -n "$(netns "$node")" link set "$NODE_IF" down
  kill_namespace "$node"
  rm -f "$RUN_DIR/slurmd-$node.pid"
  echo "killed $node"
}

start_node() {
  local node=$1 since
  since=$(date +%FT%T)
  ip -n "$(netns "$node")" link set "$NODE_IF" up
  start_slurmd "$node"
  wait_until_serving "$since" "$node"
  echo "started $node"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  kill-node) is_node "${2:-}" && kill_node "$2" ;;
  start-node) is_node "${2:-}" && start_node "$2" ;;
  exec-node) is_node "${2:-}" && exec_in_node "$2" "${@:3}" ;;
  *) echo "usage: $0 up|down|kill-node NODE|start-node NODE|exec-node NODE CMD..." >&2; exit 2 ;;
esac
