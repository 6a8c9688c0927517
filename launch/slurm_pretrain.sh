#!/bin/bash
# Pretrain on Slurm: N nodes x G GPUs, one srun task (one rank) per GPU.
#
#   sbatch launch/slurm_pretrain.sh CONFIG.yaml [key.sub=value ...]
#   sbatch --nodes=8 --gpus-per-node=8 --ntasks-per-node=8 --partition=gpu \
#          launch/slurm_pretrain.sh configs/pretrain/vit_l16_i21k.yaml train.output_dir=/ckpt/vit_l16
#
# The #SBATCH lines below are defaults: options on the sbatch command line win. Keep
# --ntasks-per-node equal to --gpus-per-node. Submit from the repository root (or set
# VITSCALE_ROOT); VITSCALE_PYTHON picks the interpreter (default: .venv/bin/python, then
# python3). sbatch passes the submitting shell's environment to the job.
#
# Preemption and time limits: the job is requeueable. 120 s before its time limit Slurm
# sends USR1 to this script, which requeues the job. Slurm itself requeues the job after
# a node failure or a preemption in PreemptMode=REQUEUE; where preemption cancels jobs
# instead, set VITSCALE_REQUEUE_ON_TERM=1 (see on_term). Every run passes train.resume=true,
# so a requeued job continues from <train.output_dir>/checkpoints/latest (a fresh run
# starts from scratch: the trainer resumes only when a checkpoint exists). Work since the
# last checkpoint is redone: choose train.ckpt_every accordingly. To requeue by hand:
# `scancel --signal=USR1 --batch JOBID`.
#
#SBATCH --job-name=vitscale-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch [sbatch options] launch/slurm_pretrain.sh CONFIG.yaml [key.sub=value ...]" >&2
    exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "slurm_pretrain.sh: not inside a Slurm job: submit it with sbatch" >&2
    exit 2
fi
config="$1"
shift

cd "${VITSCALE_ROOT:-${SLURM_SUBMIT_DIR:-.}}"
if [ ! -f "$config" ]; then
    echo "slurm_pretrain.sh: config $config not found from $(pwd) (submit from the repository root or set VITSCALE_ROOT)" >&2
    exit 2
fi
python="${VITSCALE_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi

# Rendezvous: rank 0 runs on the first node of the allocation; its NodeAddr (the
# address Slurm itself uses, which defaults to the node name) is the master address.
# The port is derived from the job id so that jobs sharing a node do not collide.
nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"  # no `| head`: SIGPIPE under pipefail
first_node="${nodes%%$'\n'*}"
master_addr="$(scontrol show node -o "$first_node" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')"
export MASTER_ADDR="${master_addr:-$first_node}"
export MASTER_PORT="${VITSCALE_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
# One rank per task: pretrain/engine/distributed.py reads SLURM_PROCID, SLURM_NTASKS and
# SLURM_LOCALID in each task, unless torchrun-style variables are set, which a submitting
# shell may have left in the environment sbatch copies.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# NCCL (GPU nodes). Defaults suit most clusters; set these in the submitting shell when
# yours needs them:
#   NCCL_SOCKET_IFNAME=ib0       interface for NCCL's bootstrap and socket transport
#                                (e.g. ib0, eth0, "^lo,docker"); a wrong pick shows as a
#                                hang at the first collective.
#   NCCL_IB_HCA=mlx5_0,mlx5_1    InfiniBand adapters to use; NCCL_IB_DISABLE=1 forces TCP;
#   NCCL_IB_GID_INDEX=3          RoCE clusters usually need the GID index.
#   NCCL_DEBUG=INFO              prints the chosen transports at start-up.
# A rank that fails or hangs in a collective aborts the whole job (after the process
# group timeout) instead of hanging it until the time limit; srun's --kill-on-bad-exit
# then stops the other tasks. torch >= 2.2 reads TORCH_NCCL_*, older ones NCCL_*.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"

requeued=0
requeue() {
    [ "$requeued" = 1 ] && return
    requeued=1
    echo "slurm_pretrain.sh: $1: requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "slurm_pretrain.sh: scontrol requeue failed" >&2
}
on_term() {
    # scancel, preemption and the time limit all send TERM, and the job's state reads
    # COMPLETING in each case, so a TERM cannot tell "stop" from "come back later".
    # Requeueing on it would turn every scancel into a requeue: opt in only where
    # preemption cancels jobs (PreemptMode=CANCEL); then a second scancel (of the
    # pending job) stops it for good.
    [ "$requeued" = 1 ] && return
    if [ "${VITSCALE_REQUEUE_ON_TERM:-0}" = 1 ]; then
        requeue TERM
    else
        echo "slurm_pretrain.sh: TERM: stopping; not requeued (set VITSCALE_REQUEUE_ON_TERM=1 to requeue on TERM)" >&2
    fi
}
trap 'requeue USR1' USR1
trap on_term TERM

echo "slurm_pretrain.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
     "$SLURM_NTASKS ranks, master $MASTER_ADDR:$MASTER_PORT, $python -m pretrain train --config $config" >&2

# Arguments go to the trainer as an argv array, never through eval or a shell string.
# train.resume=true comes first so that an explicit train.resume=false still wins.
# srun runs in the background so that the traps above run as soon as a signal arrives
# (bash defers traps while a foreground command runs).
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    "$python" -m pretrain train --config "$config" train.resume=true "$@" &
srun_pid=$!
status=0
while :; do
    wait "$srun_pid" && status=0 || status=$?
    # wait returns early (status > 128) when a trapped signal arrives; srun goes on.
    kill -0 "$srun_pid" 2>/dev/null || break
done
if [ "$requeued" = 1 ]; then
    exit 0
fi
exit "$status"
