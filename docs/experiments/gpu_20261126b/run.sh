#!/usr/bin/env bash
# One GPU call: 3 mm training data, stage 1 (from scratch, default controller gain), stage 2 (steering fine-tune at
# controller_gain 0.09), exports back; a steering eval of stage 2 in whatever time is left. SHAPE and the *_S caps
# let it be smoke-tested on a CPU (DS_ACCELERATOR=cpu SHAPE=48 ...); OUT is where the device tool collects files.
set -u
cd "$(dirname "$0")/../../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_MININTERVAL=15
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; HERE=docs/experiments/gpu_20261126b
SHAPE=${SHAPE:-128}; DATA=shards/gpu3mm
T0=$(date +%s); log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/log.txt"; }
nvidia-smi -L 2>/dev/null | tee -a "$OUT/log.txt"
prep() { OMP_NUM_THREADS=1 timeout ${PREP_S:-110} $PY -m unireg.cli prepare shards --shape $SHAPE $SHAPE $SHAPE \
           --spacing 3 3 3 --max-shard-mb 100 "$@" > /dev/null 2>>/tmp/prep_err.txt; }
rm -rf $DATA; pids=()
for i in 0 1 2 3 4 5; do prep --phantom-subjects 4 --intra-per-subject 2 --inter-pairs 4 --seed $((10 + i)) --ct-augment 0.5 --out $DATA/train/phantom$i & pids+=($!); done
for i in 0 1 2; do
  prep --phantom-subjects 0 --head-subjects 3 --intra-per-subject 2 --seed $((20 + i)) --ct-augment 0.5 --out $DATA/train/head$i & pids+=($!)
  prep --phantom-subjects 0 --synth-pairs 10 --seed $((30 + i)) --ct-augment 0.5 --out $DATA/train/synth$i & pids+=($!)
  prep --phantom-subjects 0 --organ-motion-subjects 4 --intra-per-subject 2 --seed $((40 + i)) --ct-augment 0.5 --out $DATA/train/motion$i & pids+=($!)
done
prep --phantom-subjects 2 --intra-per-subject 0 --inter-pairs 2 --seed 100 --out $DATA/val & pids+=($!)
prep --phantom-subjects 4 --intra-per-subject 1 --inter-pairs 4 --seed 200 --out $DATA/test & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
grep -i -E "error|traceback" /tmp/prep_err.txt | head -5 >> "$OUT/log.txt"
log "data: $(cat $DATA/train/*/index.json | grep -o '"pairs": [0-9]*' | awk '{s += $2} END {print s}') training pairs"
rm -rf runs/gpu_stage1 runs/gpu_stage2
for stage in 1 2; do
  OMP_NUM_THREADS=${TRAIN_THREADS:-8} timeout ${TRAIN_S:-300} $PY -m unireg.cli train --config $HERE/stage$stage.yaml \
    > "$OUT/stage${stage}_train.log" 2>&1
  log "stage $stage train rc=$?"
  tar czf "$OUT/stage$stage.tgz" runs/gpu_stage$stage/train_log.csv runs/gpu_stage$stage/export 2>>"$OUT/log.txt"
done
LEFT=$(( ${BUDGET_S:-560} - ($(date +%s) - T0) )); log "eval gets ${LEFT} s"
[ $LEFT -gt 15 ] && timeout $LEFT $PY -m unireg.cli eval --model runs/gpu_stage2/export --data $DATA/test \
  --out runs/gpu_stage2/eval --no-hd95 --steering --zero-shot gallbladder small_bowel > "$OUT/eval.log" 2>&1
log "eval rc=$?"
tar czf "$OUT/eval.tgz" runs/gpu_stage2/eval 2>>"$OUT/log.txt"
log "done"
