# Sourced by run.sh and run2.sh: the repository root as working folder, offline settings, OUT, a log function
# (to $OUT/$LOG_NAME) and, where SimpleITK is missing, a two-class stand-in for it. ConvexAdam imports SimpleITK
# at module level for file I/O it does not use here; its 53 MB wheel would not fit the device's carry.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}; T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/${LOG_NAME:-log.txt}"; }
if ! $PY -c "import SimpleITK" 2>/dev/null; then
  mkdir -p /tmp/sitk_stand_in; printf 'class Image: pass\nclass Transform: pass\n' > /tmp/sitk_stand_in/SimpleITK.py
  export PYTHONPATH=${PYTHONPATH:-}:/tmp/sitk_stand_in
fi
