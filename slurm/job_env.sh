# Sourced by slurm/*.sbatch in the batch shell: the project, its Python, and the environment of every task.
# sbatch runs a copy of the script from a spool folder, so the project is found from the submit directory.
cd "${PROJECT_ROOT:-$SLURM_SUBMIT_DIR}"
[ -f train.py ] || { echo "submit from the project root (or set PROJECT_ROOT): no train.py in $PWD" >&2; exit 2; }
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}

# One rendezvous per job: the first node, a port derived from the job id (two jobs on a node do not collide). The
# node's NodeAddr, which is its name unless slurm.conf gives it an address (where names do not resolve).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
# NCCL: fail fast instead of hanging when a rank dies; NCCL_DEBUG=INFO shows the transport chosen. Where the
# nodes have several networks, name the one to use: NCCL_SOCKET_IFNAME=ib0 (or eth0), GLOO_SOCKET_IFNAME alike;
# NCCL_IB_DISABLE=1 only where InfiniBand is broken.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

echo "$(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NNODES} node(s) x" \
  "${SLURM_NTASKS_PER_NODE:-?} task(s) x ${SLURM_CPUS_PER_TASK:-?} core(s) on ${SLURM_JOB_NODELIST}," \
  "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, ${PYTHON}"
