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
#
# Time limit and preemption: SLURM sends SIGUSR1 to this script 600 s before the time limit (--signal=B:USR1@600).
# The trap passes SIGTERM to srun, which forwards it to every torchrun, and they to their workers: every rank
# finishes its step, the checkpoint of that step is written, the workers exit 75 (REQUEUE_EXIT_CODE in
# dist_cl/runtime/preemption.py) and this script requeues the job. The requeued job keeps its job id, so its run directory,
# and resumes there. A preemption by SLURM itself (SIGTERM to every process of the job) checkpoints the same way
# within the cluster's grace time; SLURM requeues it where PreemptMode=REQUEUE. torchrun waits SHUTDOWN_TIMEOUT
# seconds (default 540, less than the 600 s warning) for its workers to write that checkpoint before it kills them.
#SBATCH --job-name=dist_cl
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
#SBATCH --requeue

set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"

CONFIG=${1:-configs/imagenet.yaml}
shift $(( $# > 0 ? 1 : 0 ))
RUN_DIR=${RUN_DIR:-/shared/runs/$(basename "$CONFIG" .yaml)-$SLURM_JOB_ID}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=${RDZV_PORT:-29500}

# data loader workers bring their own parallelism; one intra-op thread per rank avoids oversubscription, and a
# fixed count keeps a restarted run bit-identical
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# every round of workers forms its group in a new store: with torchrun's shared one, workers restarted on
# several nodes wait under different names (docs/DESIGN.md, "Restarts on several nodes")
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

echo "dist_cl: $SLURM_JOB_NUM_NODES nodes x $GPUS_PER_NODE processes, rendezvous $HEAD_NODE:$RDZV_PORT, run.dir=$RUN_DIR"

STOP_REQUESTED=0
stop_for_requeue() {
    STOP_REQUESTED=1
    echo "dist_cl: time limit near: asking every rank to checkpoint its current step and stop"
    kill -TERM "$SRUN_PID" 2>/dev/null || true
}
trap stop_for_requeue USR1

# srun starts one torchrun per node (--ntasks-per-node=1); each starts GPUS_PER_NODE workers. torchrun forwards
# SIGUSR1 as well as SIGTERM to its workers (without --signals-to-handle, SIGUSR1 killed the agent alone).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" \
    --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$HEAD_NODE:$RDZV_PORT" \
    --rdzv_id="$SLURM_JOB_ID" \
    --max-restarts=3 \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-540}" \
    launch/train.py --config "$CONFIG" run.dir="$RUN_DIR" "$@" &
SRUN_PID=$!

# wait returns early when the trap runs; wait on until srun has ended (its workers' checkpoint written)
set +e
wait "$SRUN_PID"
STATUS=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
    STATUS=$?
done
set -e
if [ "$STOP_REQUESTED" = 1 ]; then
    echo "dist_cl: checkpointed (srun exit $STATUS); requeueing job $SLURM_JOB_ID to resume $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
