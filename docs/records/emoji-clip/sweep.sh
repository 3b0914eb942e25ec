#!/bin/bash
# The image-text experiment of issue 29, resumable: run it again and finished runs are skipped.
set -u
cd /tmp/sweep
export PYTHONPATH=/tmp/sweep
OUT=/work/main/runs/emoji-compare
DATA=data.path=/work/main/data/emoji
TEACHER=$OUT/teacher-random-s0
BASE="random,sc,sc_global,group4:sc_global:selection.options.group_size=4"
TEACH="teacher-window4:sc_global:selection.teacher=$TEACHER,selection.options.false_negative_window=4,selection.warmup_epochs=0"
for seed in 0 1 2; do
  python tools/compare_strategies.py --config configs/emoji_clip.yaml --strategies "$BASE" --seeds $seed \
    --epochs 10 --eval-every 2 --out $OUT -- $DATA
  if [ ! -f $TEACHER/train/meta.json ]; then
    python tools/extract_embeddings.py --checkpoint $OUT/random-s0 --out $TEACHER --split train
  fi
  python tools/compare_strategies.py --config configs/emoji_clip.yaml --strategies "$TEACH" --seeds $seed \
    --epochs 10 --eval-every 2 --out $OUT -- $DATA
done
echo SWEEP DONE
