#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (JSON lines to ${OUT:-.}/gpu.jsonl, a log beside it), in parts that each
# fit one 10-minute device call; run them in order of priority:
#   OUT=/tmp/gpu bash benchmarks/gpu.sh ratios     # the goals: ratio and images/s at batch 64 (~5 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh detail     # where the time goes: breakdown of both (~4 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh extra      # precision, integrated gradients, 'highest' matmul cost (~6 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh explain    # the explanation job end to end and the evaluation loop (~7 min)
set -u
OUT=${OUT:-.}
PY=${PY:-python3}
PART=${1:-ratios}
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/gpu.log"; }
step() {  # step SECONDS ARGS...: one JSON line per step; a failed step is logged, the rest still run
  local limit=$1; shift
  log "$*"
  timeout "$limit" "$PY" "$@" --json 2>>"$OUT/gpu.log" | tee -a "$OUT/gpu.jsonl" || log "FAILED ($?): $*"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.log"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.log"
git log -1 --format='commit %H %s' 2>/dev/null | tee -a "$OUT/gpu.log"
case "$PART" in
  ratios)
    step 150 -m benchmarks.attribution --arch resnet50 --batch 64 --loop-outputs 2
    step 200 -m benchmarks.attribution --arch vgg16 --batch 64 --loop-outputs 2 ;;
  detail)
    step 120 -m benchmarks.breakdown --arch resnet50 --batch 64
    step 150 -m benchmarks.breakdown --arch vgg16 --batch 64 ;;
  extra)
    step 90 -m benchmarks.precision --arch resnet50 --batch 4
    step 90 -m benchmarks.precision --arch vgg16 --batch 2
    step 150 -m benchmarks.attribution --arch vgg16 --batch 64 --method integrated_gradients --loop-outputs 1 --repeats 3
    JAX_DEFAULT_MATMUL_PRECISION=highest step 150 -m benchmarks.attribution --arch vgg16 --batch 64 --loop-outputs 1 ;;
  explain)
    # the job from CUB-size JPEGs against its stages (decode, core, writer), 16 host cores; then the evaluation loop
    step 240 -m benchmarks.explain --arch resnet50 --images 4000 --batch 64
    step 150 -m benchmarks.explain --arch resnet50 --images 2000 --batch 256
    step 200 -m benchmarks.evaluation --arch resnet50 --crop 224 --size 300 --classes 20 --images-per-class 40 \
      --num-images 384 --batch 64 ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu.sh ratios|detail|extra|explain" >&2; exit 2 ;;
esac
log done "$PART"
