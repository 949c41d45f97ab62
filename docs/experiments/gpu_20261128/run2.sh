#!/usr/bin/env bash
# Second GPU call (issue 10), after resampling moved onto the GPU and pre-alignment onto the CPU: the same
# benchmark pairs (UniReg's pipeline and ConvexAdam on the GPU), one profile, and the clinical-size pair.
LOG_NAME=log2.txt; source "$(dirname "$0")/common.sh"
$PY -c "import sys; sys.path.insert(0, 'bench'); from full_size import generate_pair; from pathlib import Path; \
generate_pair((512, 512, 400), Path('/tmp/full_size'))" > /dev/null 2>&1 &
GEN=$!
timeout ${BENCH_S:-150} $PY bench/vs_optimisers.py --device cuda --methods identity pipeline convexadam \
  --cases phantom_inter phantom_intra chest_2mm chest_native abdomen_native --seeds 2 --points 5000 \
  --json "$OUT/vs_optimisers2.json" > "$OUT/vs_optimisers2.log" 2>&1
log "vs_optimisers rc $?"
timeout 40 $PY bench/pipeline_profile.py --device cuda --cases abdomen_native chest_native --top 12 > "$OUT/profile2.log" 2>&1
log "profile rc $?"
wait $GEN; log "full-size pair generated"
LEFT=$(( ${BUDGET_S:-290} - ($(date +%s) - T0) )); log "full pipeline gets ${LEFT} s"
timeout $LEFT $PY bench/full_size.py --device cuda --data /tmp/full_size --no-save --full > "$OUT/full_size_full2.log" 2>&1
log "full_size full rc $?"
