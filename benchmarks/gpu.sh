#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (JSON lines to ${OUT:-.}/gpu.jsonl, a log beside it), in parts that each
# fit one 10-minute device call; run them in order of priority:
#   OUT=/tmp/gpu bash benchmarks/gpu.sh ratios     # the goals: ratio and images/s at batch 64 (~5 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh detail     # where the time goes: breakdown of both (~4 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh extra      # precision, integrated gradients, 'highest' matmul cost (~6 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh explain    # the explanation job end to end and the evaluation loop (~7 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh explain-data  # the job over a pre-resized TFDS build and the release (~8 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh input      # training input: release folder vs TFDS build (~7 min)
#   OUT=/tmp/gpu bash benchmarks/gpu.sh core       # issue 14: folded batch norm (forward_args_s against
#                                                  # forward_unfolded_args_s), tangent layouts, the NaN/inf check's
#                                                  # cost (explain_s against explain_unchecked_s), bfloat16 backbone
#                                                  # speed and error on synthetic birds (~8 min)
# The input part needs wheels the GPU image lacks (grain, TFDS, ...): fetch them first where PyPI is reachable,
# `bash benchmarks/gpu_wheels.sh` (into wheels/, git-ignored: carry it), or point WHEELS at them.
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
plain() {  # plain SECONDS ARGS...: a command that prints its own JSON line(s)
  local limit=$1; shift
  log "$*"
  timeout "$limit" "$PY" "$@" 2>>"$OUT/gpu.log" | tee -a "$OUT/gpu.jsonl" || log "FAILED ($?): $*"
}
install_wheels() {  # the packages of benchmarks/gpu_wheels.sh whose module is missing, without an index or deps
  local w=${WHEELS:-wheels} pair module wheel
  for pair in grain:grain array_record:array_record tree:dm_tree wrapt:wrapt simplejson:simplejson \
      tensorflow_datasets:tensorflow_datasets tensorflow_metadata:tensorflow_metadata google.api:googleapis_common_protos \
      portpicker:portpicker immutabledict:immutabledict importlib_resources:importlib_resources termcolor:termcolor \
      toml:toml cloudpickle:cloudpickle etils:etils promise:promise six:six attr:attrs absl:absl_py; do
    module=${pair%%:*}; wheel=${pair#*:}
    "$PY" -c "import $module" 2>/dev/null && continue
    log "installing $wheel"
    "$PY" -m pip install --quiet --no-index --no-deps "$w"/"$wheel"-*.whl >>"$OUT/gpu.log" 2>&1 || log "FAILED: $wheel"
  done
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.log"
"$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.log"
git log -1 --format='commit %H %s' 2>/dev/null | tee -a "$OUT/gpu.log"
birds() {  # D: CUB-sized synthetic birds (500 px wide), as the release folder and as a TFDS build pre-resized to 256 px
  install_wheels
  D=$OUT/input
  [ -f "$D/release/CUB_200_2011/images.txt" ] || { log "generating 1,200 synthetic birds (500 px)";
    "$PY" -m delib_jax.data.synthetic cub --out "$D/release" --size 500 --classes 20 --images-per-class 60 \
      >>"$OUT/gpu.log" 2>&1; }
  [ -d "$D/tfds/delib_cub/resize256/1.0.0" ] || { log "building the TFDS form";
    "$PY" -m delib_jax.data.tfds build cub --manual-dir "$D/release" --data-dir "$D/tfds" --resize \
      2>>"$OUT/gpu.log" | tee -a "$OUT/gpu.log"; }
}
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
  input)  # CUB-sized synthetic birds (500 px wide), as the release folder and as a TFDS build pre-resized to 256 px
    birds
    plain 150 -m benchmarks.train --arch resnet50 --batch 64 --size 224      # the step alone: the bound
    plain 90 -m benchmarks.pipeline --compare --data-dir "$D/release" --tfds-dir "$D/tfds" --threads 16 --steps 20 \
      --rounds 2                                                               # the input alone, 16 threads
    plain 90 -m benchmarks.pipeline --compare --data-dir "$D/release" --tfds-dir "$D/tfds" --workers 8 --threads 2 \
      --steps 40 --rounds 2                                                    # 8 processes of 2 threads
    plain 150 -m benchmarks.train_input --data-dir "$D/tfds/delib_cub/resize256/1.0.0" --arch resnet50 --steps 200 \
      --threads 16                                                             # end to end, TFDS source, threads
    plain 150 -m benchmarks.train_input --data-dir "$D/tfds/delib_cub/resize256/1.0.0" --arch resnet50 --steps 200 \
      --workers 8 --threads 2 ;;                                               # end to end, TFDS source, processes
  explain-data)  # the explanation job over a dataset's split (delib explain --data-dir): the TFDS build pre-resized
    birds        # to 256 px (decoded from its records) against the release folder's 500 px JPEGs, 600 images each
    step 200 -m benchmarks.explain --arch resnet50 --data-dir "$D/tfds/delib_cub/resize256/1.0.0" --split train \
      --images 600 --batch 64
    step 200 -m benchmarks.explain --arch resnet50 --data-dir "$D/release" --split train --images 600 --batch 64 ;;
  core)
    step 130 -m benchmarks.breakdown --arch resnet50 --batch 64
    step 160 -m benchmarks.breakdown --arch vgg16 --batch 64
    step 120 -m benchmarks.attribution --arch resnet50 --batch 64 --precision bfloat16 --loop-outputs 1 --repeats 5
    step 90 -m benchmarks.precision --arch resnet50 --batch 32 --bfloat16 ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu.sh ratios|detail|extra|explain|explain-data|input|core" >&2; exit 2 ;;
esac
log done "$PART"
