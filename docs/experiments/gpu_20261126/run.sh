#!/usr/bin/env bash
# One GPU call: isolated step profile, data, tiny 3 mm training (alone), base_gpu reading, steering eval.
# SHAPE, TINY_CONFIG / BASE_CONFIG and the *_S time caps let the same script be smoke-tested on a CPU
# (DS_ACCELERATOR=cpu SHAPE=48 ...); OUT is where the device tool collects files.
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-128}; DATA=shards/gpu3mm
T0=$(date +%s); log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi -L 2>/dev/null | tee -a "$OUT/log.txt"
log start
timeout ${PROFILE_S:-60} $PY bench/train_step_profile.py --cudnn-benchmark --steps 4 --shape $SHAPE > "$OUT/profile.txt" 2>&1
log "profile rc=$?"
prep() { OMP_NUM_THREADS=1 timeout ${PREP_S:-120} $PY -m unireg.cli prepare shards --shape $SHAPE $SHAPE $SHAPE \
           --spacing 3 3 3 --max-shard-mb 100 "$@" > /dev/null 2>>/tmp/prep_err.txt; }
rm -rf $DATA; pids=()
for i in 0 1 2 3 4 5; do prep --phantom-subjects 4 --intra-per-subject 2 --inter-pairs 4 --seed $((10 + i)) --ct-augment 0.5 --out $DATA/train/phantom$i & pids+=($!); done
for i in 0 1 2; do
  prep --phantom-subjects 0 --head-subjects 3 --intra-per-subject 2 --seed $((20 + i)) --ct-augment 0.5 --out $DATA/train/head$i & pids+=($!)
  prep --phantom-subjects 0 --synth-pairs 12 --seed $((30 + i)) --ct-augment 0.5 --out $DATA/train/synth$i & pids+=($!)
  prep --phantom-subjects 0 --organ-motion-subjects 4 --intra-per-subject 2 --seed $((40 + i)) --ct-augment 0.5 --out $DATA/train/motion$i & pids+=($!)
done
prep --phantom-subjects 2 --intra-per-subject 0 --inter-pairs 2 --seed 100 --out $DATA/val & pids+=($!)
prep --phantom-subjects 4 --intra-per-subject 1 --inter-pairs 4 --seed 200 --out $DATA/test & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
grep -i -E "error|traceback" /tmp/prep_err.txt | head -5 >> "$OUT/log.txt"
log "data: $(cat $DATA/train/*/index.json | grep -o '"pairs": [0-9]*' | awk '{s += $2} END {print s}') training pairs"
rm -rf runs/gpu_tiny3mm runs/gpu_base3mm
OMP_NUM_THREADS=${TRAIN_THREADS:-8} timeout ${TINY_S:-270} $PY -m unireg.cli train --config ${TINY_CONFIG:-docs/experiments/gpu_20261126/tiny3mm.yaml} > "$OUT/tiny_train.log" 2>&1
log "tiny train rc=$?"
tar czf "$OUT/tiny.tgz" runs/gpu_tiny3mm/train_log.csv runs/gpu_tiny3mm/export 2>>"$OUT/log.txt"
OMP_NUM_THREADS=${TRAIN_THREADS:-8} timeout ${BASE_S:-120} $PY -m unireg.cli train --config ${BASE_CONFIG:-docs/experiments/gpu_20261126/base3mm.yaml} > "$OUT/base_train.log" 2>&1
log "base train rc=$?"
cp runs/gpu_base3mm/train_log.csv "$OUT/base_train_log.csv" 2>>"$OUT/log.txt"
LEFT=$(( ${BUDGET_S:-585} - ($(date +%s) - T0) )); log "eval gets ${LEFT} s"
[ $LEFT -gt 15 ] && timeout $LEFT $PY -m unireg.cli eval --model runs/gpu_tiny3mm/export --data $DATA/test --out runs/gpu_tiny3mm/eval \
  --no-hd95 --steering --zero-shot gallbladder small_bowel > "$OUT/eval.log" 2>&1
log "eval rc=$?"
tar czf "$OUT/eval.tgz" runs/gpu_tiny3mm/eval 2>>"$OUT/log.txt"
log "done"
