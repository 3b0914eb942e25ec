#!/bin/bash
# The window's controls for issue 29, resumable: the teacher's plan without the window (p = 0), and the live
# bank's sc_global with the window (p = 4). Same commit as sweep.sh.
set -u
cd /tmp/sweep
export PYTHONPATH=/tmp/sweep
OUT=/work/main/runs/emoji-compare
DATA=data.path=/work/main/data/emoji
TEACHER=$OUT/teacher-random-s0
CONTROLS="teacher-window0:sc_global:selection.teacher=$TEACHER,selection.options.false_negative_window=0,selection.warmup_epochs=0;sc_global-window4:sc_global:selection.options.false_negative_window=4"
for seed in 0 1 2; do
  IFS=';'; for entry in $CONTROLS; do unset IFS
    python tools/compare_strategies.py --config configs/emoji_clip.yaml --strategies "$entry" --seeds $seed \
      --epochs 10 --eval-every 2 --out $OUT -- $DATA
  done
done
echo SWEEP2 DONE
