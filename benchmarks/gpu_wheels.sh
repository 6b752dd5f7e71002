#!/usr/bin/env bash
# Fetch (on a machine that reaches PyPI) the wheels that the GPU machine's Python 3.12 lacks for the input part of
# benchmarks/gpu.sh: grain, array_record, tensorflow-datasets and what they import. A few MB; gpu.sh installs from
# them with --no-index --no-deps only the ones whose module is missing.
#   bash benchmarks/gpu_wheels.sh [DIR]       # default DIR: wheels/ (git-ignored; carry it to the GPU machine)
set -eu
DIR=${1:-wheels}
PY=${PY:-python3}
mkdir -p "$DIR"
# binary wheels for CPython 3.12 on x86-64 Linux
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$DIR" \
  grain array_record dm-tree wrapt simplejson
# pure-Python wheels
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$DIR" \
  "tensorflow-datasets==4.9.10" tensorflow-metadata googleapis-common-protos portpicker immutabledict \
  importlib_resources termcolor toml cloudpickle etils six attrs absl-py
"$PY" -m pip wheel --quiet --no-deps -w "$DIR" "promise==2.3"  # published as a source archive only; pure Python
ls -l "$DIR"
