#!/bin/bash
# Issue 31 on one commit and one machine, resumable (run it again: finished runs are skipped, a run cut short
# resumes from its checkpoint). The headline first, seed-major: random and the paper's chunked sc, seeds 0-2;
# then the intervention: sc cut into hard halves (group_size 16 = B/2) dealt at random, so half of every
# batch's negatives are far again while each half stays one sc batch's hard core.
set -u
cd /work/sweep-fmnist
export PYTHONPATH=/work/sweep-fmnist
OUT=/work/main/runs/fmnist-31
for seed in 0 1 2; do
  python tools/compare_strategies.py --config configs/fashion_mnist.yaml --strategies random,sc --seeds $seed \
    --epochs 20 --eval-every 2 --out $OUT -- dist.timeout_s=3600
done
for seed in 0 1 2; do
  python tools/compare_strategies.py --config configs/fashion_mnist.yaml --strategies "sc-half:sc:selection.options.group_size=16" \
    --seeds $seed --epochs 20 --eval-every 2 --out $OUT -- dist.timeout_s=3600
done
# Then the older table's other two rows on the same commit: group 4 (sc_global in groups of 4 batches) and sc_global.
for seed in 0 1 2; do
  python tools/compare_strategies.py --config configs/fashion_mnist.yaml \
    --strategies "g4:sc_global:selection.options.group_size=4,sc_global" --seeds $seed --epochs 20 --eval-every 2 \
    --out $OUT -- dist.timeout_s=3600
done
# Then the rest of RESULTS' Fashion-MNIST rows on the same commit: osgd, and random against sc_global under the
# paper's other objectives (as the issue-13 sweeps ran them, whose records name no commit).
for seed in 0 1 2; do
  python tools/compare_strategies.py --config configs/fashion_mnist.yaml --strategies osgd --seeds $seed \
    --epochs 20 --eval-every 2 --out $OUT -- dist.timeout_s=3600
done
for objective in sogclr ntxent "hcl loss.hcl_tau_plus=0.1 loss.hcl_beta=1.0"; do
  for seed in 0 1 2; do
    # shellcheck disable=SC2086  # the objective's overrides are words
    python tools/compare_strategies.py --config configs/fashion_mnist.yaml --strategies random,sc_global \
      --seeds $seed --epochs 20 --eval-every 2 --out "$OUT-${objective%% *}" -- dist.timeout_s=3600 \
      loss.name=$objective
  done
done
echo SWEEP DONE
