#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one run (writes JSON lines to ${OUT:-.}/gpu.jsonl, a log beside it).
#   OUT=/tmp/gpu bash benchmarks/gpu.sh
set -u
OUT=${OUT:-.}
PY=${PY:-python3}
log() { echo "== $*" | tee -a "$OUT/gpu.log"; }
step() {  # step SECONDS ARGS...: one JSON line per step; a failed step is logged, the rest still run
  local limit=$1; shift
  log "$*"
  timeout "$limit" "$PY" "$@" --json 2>>"$OUT/gpu.log" | tee -a "$OUT/gpu.jsonl" || log "FAILED ($?): $*"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.log"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.log"
step 150 -m benchmarks.attribution --arch resnet50 --batch 64 --loop-outputs 4
step 180 -m benchmarks.attribution --arch vgg16 --batch 64 --loop-outputs 4
step 90 -m benchmarks.breakdown --arch resnet50 --batch 64
step 90 -m benchmarks.breakdown --arch vgg16 --batch 64
step 90 -m benchmarks.precision --arch resnet50 --batch 4
step 90 -m benchmarks.precision --arch vgg16 --batch 2
step 150 -m benchmarks.attribution --arch vgg16 --batch 64 --method integrated_gradients --loop-outputs 1 --repeats 3
log done
