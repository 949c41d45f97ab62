#!/usr/bin/env bash
# Second GPU call: breathing-heavy data (phantom subjects with 2 intra + 1 inter pair each, a few synthetic pairs),
# then stage3.yaml (the carried stage 2 export, 1.75 min). Stage 2 was better than the 6 mm shipped model on real CT
# and inter-subject phantoms but behind it on breathing (intra) pairs.
# As run (PREP_S 75 s) it trained on the 18 synthetic pairs alone: every phantom job needed longer (README).
# It needs runs/carry_stage2 (the stage 2 export, copied there and carried).
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; HERE=docs/experiments/gpu_20261126b
SHAPE=${SHAPE:-128}; DATA=shards/gpu3mm_breath
T0=$(date +%s); log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
prep() { OMP_NUM_THREADS=1 timeout ${PREP_S:-75} $PY -m unireg.cli prepare shards --shape $SHAPE $SHAPE $SHAPE \
           --spacing 3 3 3 --max-shard-mb 100 "$@" > /dev/null 2>>/tmp/prep_err.txt; }
rm -rf $DATA; pids=()
for i in $(seq 0 11); do prep --phantom-subjects 3 --intra-per-subject 2 --inter-pairs 3 --seed $((300 + i)) --ct-augment 0.3 --out $DATA/train/phantom$i & pids+=($!); done
for i in 0 1 2; do prep --phantom-subjects 0 --synth-pairs 6 --seed $((330 + i)) --ct-augment 0.5 --out $DATA/train/synth$i & pids+=($!); done
prep --phantom-subjects 2 --intra-per-subject 0 --inter-pairs 2 --seed 100 --out $DATA/val & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
grep -i -E "error|traceback" /tmp/prep_err.txt | head -5 >> "$OUT/log.txt"
log "data: $(cat $DATA/train/*/index.json | grep -o '"pairs": [0-9]*' | awk '{s += $2} END {print s}') training pairs"
rm -rf runs/gpu_stage3
OMP_NUM_THREADS=${TRAIN_THREADS:-8} timeout ${TRAIN_S:-150} $PY -m unireg.cli train --config $HERE/stage3.yaml \
  > "$OUT/stage3_train.log" 2>&1
log "stage 3 train rc=$?"
tar czf "$OUT/stage3.tgz" runs/gpu_stage3/train_log.csv runs/gpu_stage3/export 2>>"$OUT/log.txt"
log "done"
