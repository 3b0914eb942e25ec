#!/usr/bin/env bash
# Exercise the CUDA paths of dist_cl that one GPU can run and print a table; exit non-zero if any check fails.
#
#   tools/gpu_check.sh              # with dist_cl installed: pip install -e '.[gpu,dev]'
#   tools/gpu_check.sh --install    # installs it first, from this repository's files
#
# One GPU means world size 1 on nccl (nccl refuses two ranks on one device); the group is the trainer's
# own, cpu:gloo,cuda:nccl. World size 1 takes the shortcuts that skip the cross-rank paths: the gathers
# with gradient and the bank's row gather need two GPUs on nccl (they have run on gloo), and so does
# SyncBatchNorm's cross-rank statistics (never run: it has no CPU kernel). It is meant to finish within 8 minutes on one H200 (not measured yet); every
# check has a time limit well above its expected time, so a hang is a failed row, not a stuck script.
# Logs and runs go to $GPU_CHECK_DIR (default: a new temporary directory), named after the table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--install" ]]; then
    "$PY" -m pip install --quiet -e '.[gpu,dev]' || exit 2
fi
OUT=${GPU_CHECK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1
TRAIN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 launch/train.py dist.backend=nccl)
ROWS=()
FAILED=0

# check NAME LIMIT_S CMD...: run CMD with a time limit, log it to $OUT/NAME.log, add a table row.
# The row's figures are the JSON that a tools/gpu_check.py check prints, or the end of the log.
check() {
    local name=$1 limit=$2 started status figures
    shift 2
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    figures=$(grep -h '^{"check"' "$OUT/$name.log" | tail -n 1)
    if (( status == 124 || status == 137 )); then
        figures="timed out after ${limit}s (hang?)"
    elif [[ -z "$figures" ]]; then
        figures=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-150)
    fi
    if (( status == 0 )); then result=ok; else result="FAIL ($status)"; FAILED=1; fi
    ROWS+=("$(printf '| %-28s | %-10s | %5ss | %s |' "$name" "$result" "$(( $(date +%s) - started ))" "$figures")")
}

# expect NAME FILE PATTERN: a row that fails unless FILE holds PATTERN (what a run must have left behind)
expect() {
    if grep -q -- "$3" "$2" 2>/dev/null; then result=ok; else result=FAIL; FAILED=1; fi
    ROWS+=("$(printf '| %-28s | %-10s | %6s | %s |' "$1" "$result" "" "$3 in ${2#"$OUT"/}")")
}

check versions 60 "$PY" -c "import faiss, torch; print(torch.__version__, 'CUDA', torch.version.cuda, \
    torch.cuda.get_device_name(), 'faiss', faiss.__version__, 'GPUs', faiss.get_num_gpus())"

# 1. nccl, 2 epochs: mid-epoch checkpoints, evaluations, sc_global computed ahead on the planner thread,
#    SyncBatchNorm, GPU FAISS (digits: 1437 pairs, small cells so the k-means and the cells run)
check train-nccl-sc_global-overlap 150 "${TRAIN[@]}" run.dir="$OUT/train" train.epochs=2 \
    checkpoint.every_steps=10 eval.every_epochs=1 selection.strategy=sc_global selection.overlap=true \
    selection.warmup_epochs=0 selection.options.cell_size=256 model.sync_bn=true
expect train-checkpoints "$OUT/train/checkpoints/latest" "step-00000044.pt"
expect train-evaluations "$OUT/train/metrics.jsonl" '"epoch": 2'

# 2. AMP: training under bf16 and fp16, and the loss of autocast features equal to the float32 loss
for amp in bf16 fp16; do
    check "train-amp-$amp" 90 "${TRAIN[@]}" run.dir="$OUT/amp-$amp" train.epochs=1 eval.every_epochs=0 \
        train.amp=$amp
    check "loss-precision-$amp" 60 "$PY" tools/gpu_check.py loss-precision --amp $amp
done

# 3. the free-embedding model on CUDA: sparse gradients through the gathered rows, clipped with foreach kernels
check train-free-embeddings 90 "${TRAIN[@]}" --config configs/synthetic.yaml run.dir="$OUT/free" \
    data.num_samples=100000 model.embed_dim=128 train.global_batch_size=256 loss.tau=0.1 train.epochs=2 \
    train.grad_clip=1.0 eval.every_epochs=0 selection.strategy=sc_global selection.warmup_epochs=1

# 4. shards read by 4 workers per loader while the planner thread runs (a deadlock would time out)
check make-shards 60 bash -c "for split in train heldout; do $PY tools/make_shards.py --source digits \
    --split \$split --out '$OUT/shards/'\$split --samples-per-shard 200 || exit 1; done"
check train-shards-4-workers 120 "${TRAIN[@]}" run.dir="$OUT/shards-run" data.name=shards \
    data.path="$OUT/shards" data.image_size=8 model.in_chans=1 data.num_workers=4 train.epochs=2 \
    eval.every_epochs=2 selection.strategy=sc_global selection.overlap=true selection.warmup_epochs=0 \
    selection.options.cell_size=256

# 5. kill the worker mid-run (SIGKILL at its step-10 checkpoint), then resume from the checkpoint
check kill-and-resume 150 bash -c "
    ${TRAIN[*]} run.dir='$OUT/resume' train.epochs=2 eval.every_epochs=0 checkpoint.every_steps=5 \
        selection.strategy=sc_global selection.overlap=true selection.warmup_epochs=0 & agent=\$!
    for _ in \$(seq 600); do [[ -e '$OUT/resume/checkpoints/step-00000010.pt' ]] && break; sleep 0.1; done
    pkill -KILL -P \$agent -f launch/train.py; wait \$agent
    ${TRAIN[*]} run.dir='$OUT/resume' train.epochs=2 eval.every_epochs=0 checkpoint.every_steps=5 \
        selection.strategy=sc_global selection.overlap=true selection.warmup_epochs=0 --resume latest"
# a GPU step takes milliseconds: by the time the kill lands the newest checkpoint may be epoch 1's
expect resumed-from-checkpoint "$OUT/kill-and-resume.log" "resumed from .* at epoch [01] step"
expect resumed-to-the-end "$OUT/resume/checkpoints/latest" "step-00000044.pt"

# 6. embeddings and evaluation of the first run's checkpoint on CUDA
check extract-embeddings 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    tools/extract_embeddings.py --checkpoint "$OUT/train" --out "$OUT/embeddings"
check evaluate-embeddings 60 "$PY" tools/evaluate.py --embeddings "$OUT/embeddings" --json "$OUT/eval.json"
check evaluate-checkpoint 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 \
    tools/evaluate.py --checkpoint "$OUT/train"

# 7. sc_global at N = 1M, d = 128, B = 256: GPU against the CPU path (seconds, peak GPU memory, lift)
check selection-1M 240 "$PY" tools/gpu_check.py selection --n 1000000 --dim 128 --batch-size 256
# the 10M target (under 60 s, within GPU memory): the GPU path alone
check selection-10M 180 "$PY" tools/gpu_check.py selection --n 10000000 --dim 128 --batch-size 256 --no-cpu-reference

# 8. trainer samples/s against a minimal DDP loop (same model, random batches, the two taking turns step by
#    step): the free-embedding model, which needs no data pipeline, so the difference is the trainer's own
#    (bank, syncs, selection); and digits images, where the CPU augmentations of 8 loader workers are part of it
SYNTHETIC=(--config configs/synthetic.yaml data.num_samples=100000 model.embed_dim=128 train.global_batch_size=256
           loss.tau=0.1)
check throughput-free-random 120 "$PY" tools/gpu_check.py throughput "${SYNTHETIC[@]}" \
    selection.strategy=random run.dir="$OUT/throughput-free-random"
check throughput-free-sc_global 120 "$PY" tools/gpu_check.py throughput "${SYNTHETIC[@]}" \
    selection.strategy=sc_global selection.overlap=true selection.warmup_epochs=0 run.dir="$OUT/throughput-free-sc"
check throughput-digits-sc_global 120 "$PY" tools/gpu_check.py throughput data.num_workers=8 \
    selection.strategy=sc_global selection.overlap=true selection.warmup_epochs=0 run.dir="$OUT/throughput-digits"

printf '| %-28s | %-10s | %6s | %s |\n' check result time figures
printf '|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..30})" "$(printf -- '-%.0s' {1..12})" "--------" "--------"
printf '%s\n' "${ROWS[@]}"
echo "logs: $OUT"
exit $FAILED
