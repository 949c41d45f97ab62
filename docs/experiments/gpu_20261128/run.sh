#!/usr/bin/env bash
# One GPU call (issue 10): the default pipeline on the GPU against ConvexAdam on the same GPU, on the
# benchmark's phantom and real-CT pairs, then a clinical-size pair (512x512x400) with the network alone and
# with the full pipeline. BUDGET_S bounds the whole call; OUT is where the device tool collects files.
# The real scans travel in $UNIREG_BENCH_CACHE (no package index there); common.sh has the rest of the setting up.
LOG_NAME=log.txt; source "$(dirname "$0")/common.sh"
nvidia-smi -L 2>/dev/null | tee -a "$OUT/log.txt"
$PY -c "import torch, unireg; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/log.txt"
# the clinical-size pair is generated on the CPU while the GPU runs the benchmark
$PY -c "import sys; sys.path.insert(0, 'bench'); from full_size import generate_pair; from pathlib import Path; \
generate_pair((512, 512, 400), Path('/tmp/full_size'))" > "$OUT/full_size_gen.log" 2>&1 &
GEN=$!
timeout ${BENCH_S:-240} $PY bench/vs_optimisers.py --device cuda --methods identity network pipeline convexadam \
  --cases phantom_inter phantom_intra chest_2mm chest_native abdomen_native --seeds 2 --points 5000 \
  --json "$OUT/vs_optimisers.json" > "$OUT/vs_optimisers.log" 2>&1
log "vs_optimisers rc $?"
wait $GEN; log "full-size pair generated"
timeout 90 $PY bench/full_size.py --device cuda --data /tmp/full_size --no-save > "$OUT/full_size_network.log" 2>&1
log "full_size network rc $?"
LEFT=$(( ${BUDGET_S:-420} - ($(date +%s) - T0) )); log "full pipeline gets ${LEFT} s"
timeout $LEFT $PY bench/full_size.py --device cuda --data /tmp/full_size --no-save --full > "$OUT/full_size_full.log" 2>&1
log "full_size full rc $?"
