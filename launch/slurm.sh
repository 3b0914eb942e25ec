#!/bin/bash
# Train dist_cl on several SLURM nodes: one torchrun agent per node, c10d rendezvous on the job's first node,
# one run directory on a file system every node sees (checkpoints, TensorBoard, metrics).
#
#   sbatch launch/slurm.sh                                          # configs/imagenet.yaml, 4 nodes x 8 GPUs
#   sbatch --nodes=1 --gpus-per-node=4 launch/slurm.sh configs/cifar100_32px.yaml
#   RUN_DIR=/shared/runs/in1k-sc sbatch launch/slurm.sh configs/imagenet.yaml selection.strategy=sc_global
#
# Arguments: the config, then dotted overrides for launch/train.py. Each job gets a run directory of its own,
# /shared/runs/<config name>-<job id>, so two experiments from one config never share one. To resume a run,
# name its directory: RUN_DIR=/shared/runs/imagenet-123456 sbatch launch/slurm.sh configs/imagenet.yaml resumes
# from its newest checkpoint (launch/train.py --resume auto). A run directory is locked for its job's lifetime
# (run.lock): a second job on it fails at once, naming the first. Within a job, torchrun restarts failed workers
# up to --max-restarts times and they resume on their own.
#SBATCH --job-name=dist_cl
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG=${1:-configs/imagenet.yaml}
shift $(( $# > 0 ? 1 : 0 ))
RUN_DIR=${RUN_DIR:-/shared/runs/$(basename "$CONFIG" .yaml)-$SLURM_JOB_ID}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# data loader workers bring their own parallelism; one intra-op thread per rank avoids oversubscription
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "dist_cl: $SLURM_JOB_NUM_NODES nodes x $GPUS_PER_NODE processes, rendezvous $HEAD_NODE:$RDZV_PORT, run.dir=$RUN_DIR"

# srun starts one torchrun per node (--ntasks-per-node=1); each starts GPUS_PER_NODE workers
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id="$SLURM_JOB_ID" \
    --max-restarts=3 \
    launch/train.py --config "$CONFIG" run.dir="$RUN_DIR" "$@"
