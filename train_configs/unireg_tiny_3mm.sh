#!/usr/bin/env bash
# A 3 mm tiny UniReg, end to end (train_configs/unireg_tiny_3mm.yaml): training data written in parallel (torso and
# head-and-neck phantoms, SynthMorph-style synthetic pairs, organ-motion pairs, half CT-augmented; held-out test
# subjects apart), then each config trained in turn, then `unireg eval --steering` on the held-out pairs.
#   bash train_configs/unireg_tiny_3mm.sh [CONFIG ...]      (default: train_configs/unireg_tiny_3mm.yaml)
# SHAPE / SPACING set the phantoms' grid (default 128^3 at 3 mm), TRAIN_THREADS the trainer's CPU threads
# (default: the cores, at most 8), PYTHON the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SHAPE=${SHAPE:-128}
SPACING=${SPACING:-3}
ZERO_SHOT="gallbladder small_bowel"        # the configs' data.zero_shot_organs
CONFIGS=("${@:-train_configs/unireg_tiny_3mm.yaml}")
# The data folder is where the first config reads: data.train's parent (train/, val/, test/ inside).
DATA=$($PY -c "import sys; from unireg.training.config import TrainConfig as T; c = T.from_yaml(sys.argv[1]); \
print(c.resolve(c.data.train).parent)" "${CONFIGS[0]}")

wait_all() { local pid; for pid in "$@"; do wait "$pid"; done; }   # fails if any job failed
prep() { OMP_NUM_THREADS=1 $PY -m unireg.cli prepare shards --shape $SHAPE $SHAPE $SHAPE \
           --spacing $SPACING $SPACING $SPACING --max-shard-mb 200 "$@" > /dev/null; }

if [ ! -f "$DATA/test/index.json" ]; then
  rm -rf "$DATA"; pids=()
  for i in 0 1 2 3 4 5 6 7; do
    prep --phantom-subjects 6 --intra-per-subject 2 --seed $((10 + i)) --ct-augment 0.5 --out $DATA/train/phantom$i & pids+=($!)
  done
  for i in 0 1 2 3; do
    prep --phantom-subjects 0 --head-subjects 4 --intra-per-subject 2 --seed $((20 + i)) --ct-augment 0.5 \
         --out $DATA/train/head$i & pids+=($!)
    prep --phantom-subjects 0 --synth-pairs 24 --seed $((30 + i)) --ct-augment 0.5 --out $DATA/train/synth$i & pids+=($!)
    prep --phantom-subjects 0 --organ-motion-subjects 6 --intra-per-subject 2 --seed $((40 + i)) --ct-augment 0.5 \
         --out $DATA/train/motion$i & pids+=($!)
  done
  prep --phantom-subjects 4 --intra-per-subject 0 --inter-pairs 4 --seed 100 --out $DATA/val & pids+=($!)
  prep --phantom-subjects 8 --intra-per-subject 1 --inter-pairs 8 --seed 200 --out $DATA/test & pids+=($!)
  wait_all "${pids[@]}"
  echo "data ready: $(cat $DATA/train/*/index.json | grep -o '"pairs": [0-9]*' | awk '{s += $2} END {print s}') training pairs"
fi

run_dir() { $PY -c "import sys; from unireg.training.config import TrainConfig as T; print(T.from_yaml(sys.argv[1]).output_dir)" "$1"; }
# One trainer at a time: on one H100 two concurrent trainers made 1.4 s/step each, one alone 0.21 s/step
# (docs/experiments/gpu_20261126). Its loader workers need the cores its torch threads leave free.
for config in "${CONFIGS[@]}"; do
  run=$(run_dir "$config"); mkdir -p "$run"
  OMP_NUM_THREADS=${TRAIN_THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))} $PY -m unireg.cli train --config "$config" \
    > "$run/train.log" 2>&1
done

for config in "${CONFIGS[@]}"; do
  run=$(run_dir "$config")
  $PY -m unireg.cli eval --model "$run/export" --data $DATA/test --out "$run/eval" --steering --zero-shot $ZERO_SHOT \
    > "$run/eval.log" 2>&1 &
done
wait
