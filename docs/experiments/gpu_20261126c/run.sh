#!/usr/bin/env bash
# One GPU call: the 6 mm steering data (tiny_phantom_steer.yaml's recipe, generated here on 16 cores), then two
# steering fine-tunes of unireg-tiny-phantom side by side on the one GPU (A: the recipe as is; B: named organs
# weighted to win), then `unireg eval --steering` of both on the model card's held-out pairs (seed 200,
# regenerated here). BUDGET_S bounds the whole call; OUT is where the device tool collects files.
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; HERE=docs/experiments/gpu_20261126c; DATA=shards/gpu6mm
T0=$(date +%s); log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi -L 2>/dev/null | tee -a "$OUT/log.txt"
prep() { OMP_NUM_THREADS=1 timeout ${PREP_S:-90} $PY -m unireg.cli prepare shards --shape 64 64 64 \
           --spacing 6 6 6 --max-shard-mb 8 "$@" > /dev/null 2>>/tmp/prep_err.txt; }
rm -rf $DATA; pids=()
for i in 0 1 2 3 4 5; do prep --phantom-subjects 4 --intra-per-subject 2 --inter-pairs 4 --seed $((10 + i)) --ct-augment 0.5 --out $DATA/train/phantom$i & pids+=($!); done
for i in 0 1; do
  prep --phantom-subjects 0 --head-subjects 4 --intra-per-subject 2 --inter-pairs 4 --seed $((20 + i)) --ct-augment 0.5 --out $DATA/train/head$i & pids+=($!)
  prep --phantom-subjects 0 --synth-pairs 24 --seed $((30 + i)) --ct-augment 0.5 --out $DATA/train/synth$i & pids+=($!)
done
for i in 0 1 2 3; do prep --phantom-subjects 0 --organ-motion-subjects 6 --intra-per-subject 2 --seed $((40 + i)) --ct-augment 0.5 --out $DATA/train/motion$i & pids+=($!); done
prep --phantom-subjects 2 --intra-per-subject 0 --inter-pairs 2 --seed 100 --out $DATA/val & pids+=($!)
# the model card's held-out pairs (shards/mix6mm/test there), regenerated from their seed: too large to carry
prep --phantom-subjects 8 --intra-per-subject 1 --inter-pairs 8 --seed 200 --out $DATA/test & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
grep -i -E "error|traceback" /tmp/prep_err.txt | head -5 >> "$OUT/log.txt"
log "data: $(cat $DATA/train/*/index.json | grep -o '"pairs": [0-9]*' | awk '{s += $2} END {print s}') training pairs"
rm -rf runs/gpu_steer_a runs/gpu_steer_b
for run in a b; do
  OMP_NUM_THREADS=4 timeout ${TRAIN_S:-420} $PY -m unireg.cli train --config $HERE/steer_$run.yaml \
    > "$OUT/steer_${run}_train.log" 2>&1 &
  pids+=($!)
done
wait; log "training done"
for run in a b; do tar czf "$OUT/steer_$run.tgz" runs/gpu_steer_$run/train_log.csv runs/gpu_steer_$run/export 2>>"$OUT/log.txt"; done
LEFT=$(( ${BUDGET_S:-560} - ($(date +%s) - T0) )); log "eval gets ${LEFT} s"
for run in a b; do
  [ $LEFT -gt 15 ] && timeout $LEFT $PY -m unireg.cli eval --model runs/gpu_steer_$run/export --data $DATA/test \
    --out "$OUT/eval_$run" --no-hd95 --steering --zero-shot gallbladder small_bowel > "$OUT/eval_$run.log" 2>&1 &
done
wait; log "done"
