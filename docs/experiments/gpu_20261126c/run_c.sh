#!/usr/bin/env bash
# The second, short GPU call: run C (steer_c.yaml) from run A's export (carried), on data made here as run.sh makes it.
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; HERE=docs/experiments/gpu_20261126c; DATA=shards/gpu6mm
T0=$(date +%s); log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log_c.txt"; }
prep() { OMP_NUM_THREADS=1 timeout ${PREP_S:-60} $PY -m unireg.cli prepare shards --shape 64 64 64 \
           --spacing 6 6 6 --max-shard-mb 8 "$@" > /dev/null 2>>/tmp/prep_err.txt; }
rm -rf $DATA; pids=()
for i in 0 1 2 3; do prep --phantom-subjects 4 --intra-per-subject 2 --inter-pairs 4 --seed $((10 + i)) --ct-augment 0.5 --out $DATA/train/phantom$i & pids+=($!); done
prep --phantom-subjects 0 --head-subjects 4 --intra-per-subject 2 --inter-pairs 4 --seed 20 --ct-augment 0.5 --out $DATA/train/head0 & pids+=($!)
prep --phantom-subjects 0 --synth-pairs 24 --seed 30 --ct-augment 0.5 --out $DATA/train/synth0 & pids+=($!)
prep --phantom-subjects 2 --intra-per-subject 0 --inter-pairs 2 --seed 100 --out $DATA/val & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
log "data: $(cat $DATA/train/*/index.json | grep -o '"pairs": [0-9]*' | awk '{s += $2} END {print s}') training pairs"
rm -rf runs/gpu_steer_c
OMP_NUM_THREADS=8 timeout ${TRAIN_S:-190} $PY -m unireg.cli train --config $HERE/steer_c.yaml > "$OUT/steer_c_train.log" 2>&1
log "train rc=$?"
tar czf "$OUT/steer_c.tgz" runs/gpu_steer_c/train_log.csv runs/gpu_steer_c/export 2>>"$OUT/log_c.txt"
log "done"
