#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU, a CUDA build of torch and no network:
# build lmkern with its CUDA kernels, run every test (the gpu ones included), run the
# benchmark suite, and leave logs, result files and a one-screen summary in OUT.
# Steps run in this order so that an early failure still leaves what ran before it.
#
#   scripts/gpu_check.sh OUT        (make gpu-check OUT=...)
set -uo pipefail
out=$(mkdir -p "${1:?usage: scripts/gpu_check.sh OUT}" && cd "$1" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python}

# step NAME COMMAND...: runs COMMAND with its output in OUT/NAME.log, and records
# "NAME exit-code seconds" in OUT/steps.txt.
step() {
  local name=$1 start code
  shift
  echo "== $name"
  start=$(date +%s)
  "$@" >"$out/$name.log" 2>&1
  code=$?
  echo "$name $code $(($(date +%s) - start))" >>"$out/steps.txt"
  return $code
}

finish() {
  "$python" -m benchmarks.summary "$out" | tee "$out/summary.txt"
  exit "$1"
}

: >"$out/steps.txt"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
step build env LMKERN_BUILD_CUDA="${LMKERN_BUILD_CUDA:-1}" "$python" -m pip install --no-build-isolation --no-deps -e . || finish 1
step info "$python" -m lmkern.info
step tests env LMKERN_REQUIRE_BACKENDS=native,triton "$python" -m pytest tests -q -rs -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$out/tests.xml"
tests=$?
step bench "$python" -m benchmarks.run --out "$out/results"
bench=$?
finish $((tests || bench))
