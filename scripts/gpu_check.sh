#!/usr/bin/env bash
# The GPU check: two commands, each under 9 minutes on one H100/H200 (16 CPU cores, no
# network, the machine's own python, torch and triton), most valuable evidence first.
#
#   scripts/gpu_check.sh 1 OUT   versions; build with the CUDA kernels for sm_90 only; the
#                                native CUDA tests; a Triton smoke test (every kernel, one
#                                call per dtype, forward and backward, against the reference);
#                                the device's ceilings; a short benchmark of the main ops
#   scripts/gpu_check.sh 2 OUT   the rest of the GPU tests (pytest-xdist, one config per
#                                Triton kernel); the ceilings; a short benchmark of the other ops
#   scripts/gpu_check.sh N OUT --cpu   the same steps on CPU at tiny sizes (CI runs both)
#
# Each step runs under its own time limit (LIMIT seconds, then killed), with unbuffered
# output into its own log and result files, so a step stopped at its limit loses only
# itself; the limits of a command add up to under 9 minutes. OUT gets two files:
# gpu-check-N.tar.gz (every log, JUnit report and result file) and summary-N.txt (one
# screen: steps, tests per op and backend, throughput against the measured ceilings and the
# best other provider), also printed at the end.
set -uo pipefail
part=${1:?usage: scripts/gpu_check.sh 1|2 OUT [--cpu]}
out=$(mkdir -p "${2:?usage: scripts/gpu_check.sh 1|2 OUT [--cpu]}" && cd "$2" && pwd)
mode=${3:-gpu}
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
work=$(mktemp -d)
mkdir -p "$work/results"
export PYTHONUNBUFFERED=1

# step NAME LIMIT COMMAND...: COMMAND with its output in NAME.log, stopped after LIMIT
# seconds (then killed 5 s later); records "NAME exit-code seconds/LIMIT" in steps.txt.
failed=0
step() {
  local name=$1 limit=$2 start code
  shift 2
  limit=$((limit * scale))
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >"$work/$name.log" 2>&1
  code=$?
  echo "$name $code $(($(date +%s) - start))/$limit" >>"$work/steps.txt"
  tail -n 3 "$work/$name.log"
  [ "$code" -eq 0 ] || failed=1
}

pytest_step() {  # pytest_step NAME LIMIT PYTEST-ARGS...: JUnit report in NAME.xml
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$python" -m pytest -q -rs -p no:cacheprovider --junitxml="$work/$name.xml" "$@"
}

bench_step() {  # bench_step OP LIMIT: the op's short (GPU) or quick (CPU) benchmark
  local size=--short
  [ "$mode" = --cpu ] && size=--quick
  step "bench-$1" "$2" "$python" -m benchmarks.run --op "$1" "$size" --out "$work/results"
}

scale=1  # on CPU (2 cores, the interpreter, CPU torch.compile) every limit is 5 times longer
if [ "$mode" = --cpu ]; then
  scale=5
  build_env=(LMKERN_BUILD_CUDA=0 MAX_JOBS=2)
  device=cpu
  quick=--quick
  xdist=()
else  # the GPU machine has pytest-xdist
  build_env=(LMKERN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16)
  device=cuda
  quick=
  xdist=(-n 8)
fi
# The GPU tests are the cuda cases (marked gpu); on CPU the same files' cpu cases stand in.
selected=(-m gpu)
[ "$mode" = --cpu ] && selected=(-m "not gpu")

: >"$work/steps.txt"
step env 15 sh -c "nvidia-smi || echo 'no nvidia-smi'; nvcc --version || echo 'no nvcc'; $python -c 'import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)'"
# Incremental (setup.py keeps the objects in build/temp): fast where the machine kept a build.
step build 225 env "${build_env[@]}" "$python" -m pip install --no-build-isolation --no-deps --no-index -e .
step info 15 "$python" -m lmkern.info
if [ "$part" = 1 ]; then
  if [ "$mode" = --cpu ]; then
    pytest_step native-tests 60 tests/test_cross_entropy.py -k "native and cpu and float32 and matches"
  else
    pytest_step native-tests 60 tests -m gpu -k native
  fi
  LMKERN_TRITON_ONE_CONFIG=1 pytest_step triton-smoke 90 tests/test_triton_smoke.py "${selected[@]}"
  step ceilings 15 "$python" -m benchmarks.ceilings --device "$device" $quick --out "$work/results/ceilings.json"
  for op in attention cross_entropy layer_norm; do
    bench_step "$op" 30
  done  # limits: 15 + 225 + 15 + 60 + 90 + 15 + 3 x 30 = 510 s
else
  if [ "$mode" = --cpu ]; then
    LMKERN_TRITON_ONE_CONFIG=1 pytest_step tests 150 tests/test_backend.py tests/test_layer_norm.py -k "cpu and float32"
  else
    LMKERN_TRITON_ONE_CONFIG=1 pytest_step tests 150 tests "${selected[@]}" -k "not native" \
      --ignore tests/test_triton_smoke.py "${xdist[@]}"
  fi
  step ceilings 15 "$python" -m benchmarks.ceilings --device "$device" $quick --out "$work/results/ceilings.json"
  for op in ffn linear_cross_entropy attention_with_kv_cache add_layer_norm; do
    bench_step "$op" 25
  done  # limits: 15 + 225 + 15 + 150 + 15 + 4 x 25 = 520 s
fi

"$python" -m benchmarks.summary "$work" >"$work/summary.txt" 2>&1
cp "$work/summary.txt" "$out/summary-$part.txt"
tar -czf "$out/gpu-check-$part.tar.gz" -C "$work" .
rm -rf "$work"
cat "$out/summary-$part.txt"
echo "wrote $out/gpu-check-$part.tar.gz and $out/summary-$part.txt"
exit "$failed"  # non-zero when a step failed or was stopped at its limit
