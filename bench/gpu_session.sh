#!/usr/bin/env bash
# The GPU check of fastsgd, end to end, in about 8 minutes: build with the CUDA
# kernels required, then the correctness stages (CUDA backend, Triton, ghost
# batch norm), then the benchmarks. It cannot pass without testing the GPU code:
#   - the build sets FASTSGD_REQUIRE_CUDA=1 and points CMake at nvcc, so a
#     missing or rejected CUDA toolchain fails the build;
#   - the tests run with FASTSGD_REQUIRE_GPU=1, which turns every "no GPU / no
#     cuda backend / no triton" skip into a failure (tests/requirements.py);
#   - the check stage fails unless fastsgd._C has its CUDA kernels and a CUDA
#     device is present.
# Nothing is installed into the machine's Python: the package is built into a
# fresh virtual environment (with the system's torch/triton/pytest) under the
# output folder, offline (--no-build-isolation --no-deps), with its own CMake
# build folder there.
# Each stage has its own limit (timeout -s INT, so pytest still writes its
# summary and junit file) and pytest-timeout limits single tests when it is
# installed. Every stage's log, junit file and one summary line are written
# when the stage ends, so a run cut short keeps what finished.
#
#   bash bench/gpu_session.sh               # all stages, from any directory
#   bash bench/gpu_session.sh triton bench  # chosen stages (build and check always run)
#
# Results go to $OUT when set, else ./gpu_out. Exit status: 0 only when every
# stage that ran passed. Afterwards: copy the *.json rows to bench/results/ and
# set AUTO_ORDER["cuda"] in fastsgd/backends.py from the optimizer rows.
set -u
cd "$(dirname "$0")/.."
repo=$PWD
out="${OUT:-$repo/gpu_out}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
rows=()
failed=0

# Stage limits in seconds (about 8 minutes together).
LIMIT_BUILD=${LIMIT_BUILD:-150}
LIMIT_CHECK=${LIMIT_CHECK:-30}
LIMIT_CUDA=${LIMIT_CUDA:-80}
LIMIT_TRITON=${LIMIT_TRITON:-80}
LIMIT_GHOST_BN=${LIMIT_GHOST_BN:-40}
LIMIT_BENCH_OPTIM=${LIMIT_BENCH_OPTIM:-70}  # includes the -2pass LARS/LAMB rows and their compiles
LIMIT_BENCH_GHOST_BN=${LIMIT_BENCH_GHOST_BN:-20}
TEST_TIMEOUT=${TEST_TIMEOUT:-60}  # seconds per test (pytest-timeout)

stage() {  # stage NAME LIMIT FILES COMMAND...: run under a limit, log, record result and time
  local name=$1 limit=$2 files=$3
  shift 3
  local t0=$SECONDS rc result
  echo "== $name (limit ${limit}s): $*" | tee "$out/$name.log"
  timeout -s INT -k 20 "$limit" "$@" >> "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result=pass ;;
    124|137) result="fail (time limit)" ;;
    *) result="fail (rc $rc)" ;;
  esac
  [ "$rc" -eq 0 ] || failed=1
  tail -n 3 "$out/$name.log"
  rows+=("$(printf '%-16s %-20s %5ss   %s' "$name" "$result" "$((SECONDS - t0))" "$files")")
  printf '%s\n' "${rows[-1]}" >> "$summary"
  return $rc
}

skipped() {  # a stage that could not run: a failure in the table
  rows+=("$(printf '%-16s %-20s %5s    %s' "$1" "fail (not run)" "-" "$2")")
  printf '%s\n' "${rows[-1]}" >> "$summary"
  failed=1
}

table() {
  echo
  printf '%-16s %-20s %6s   %s\n' stage result time files
  printf '%s\n' "${rows[@]}"
  echo
  if [ "$failed" -eq 0 ]; then echo "all stages passed"; else echo "FAILED: see the logs above"; fi
}

want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
stages=("$@")
if [ "${#stages[@]}" -eq 0 ]; then stages=(cuda triton ghost_bn bench); fi

# ---- environment: facts about the machine, then a fresh venv ------------------------------
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr ' ' '_' | tr -cd '[:alnum:]_-')
gpu=${gpu:-no_gpu}
nvcc_path=$(command -v nvcc || true)
venv="$out/venv"
python3 -m venv --system-site-packages "$venv" || { echo "python3 -m venv failed"; exit 1; }
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PYTHONSAFEPATH=1  # python3 -m never puts the working directory first on sys.path
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# One architecture, the one present (half the nvcc time of the default 80;90).
arch=$(python3 -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null)
export FASTSGD_REQUIRE_CUDA=1 FASTSGD_REQUIRE_GPU=1
export CMAKE_ARGS="${CMAKE_ARGS:-} -DFASTSGD_REQUIRE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${arch:-90}"
[ -n "$nvcc_path" ] && export CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_CUDA_COMPILER=$nvcc_path" CUDACXX="$nvcc_path"

pytest_args=(-q -rfEs -p no:cacheprovider -o junit_family=xunit2 --durations=10)
if python3 -c "import pytest_timeout" 2>/dev/null; then
  pytest_args+=(--timeout="$TEST_TIMEOUT")
else
  echo "pytest-timeout is not installed: only the stage limits apply" | tee -a "$summary"
fi
run_tests() {  # run_tests NAME LIMIT PYTEST-ARGS...
  local name=$1 limit=$2
  shift 2
  stage "$name" "$limit" "$out/$name.log, $out/$name.xml" \
    python3 -m pytest "${pytest_args[@]}" --junitxml="$out/$name.xml" "$@"
}

# ---- build and check: nothing else can run without them -----------------------------------
if ! stage build "$LIMIT_BUILD" "$out/build.log" \
    python3 -m pip install -v --no-build-isolation --no-deps --config-settings=build-dir="$out/build" \
      -e "$repo"; then
  for s in check "${stages[@]}"; do skipped "$s" "-"; done
  table
  exit 1
fi
stage check "$LIMIT_CHECK" "$out/check.log" python3 - <<'EOF'
import sys
import torch
import fastsgd
from fastsgd import _C
print("torch", torch.__version__, "cuda", torch.version.cuda, "| _C.has_cuda", _C.has_cuda,
      "| runtime", _C.cuda_runtime_version(), "| devices", _C.cuda_device_count())
print(fastsgd.available_backends())
problems = []
if not _C.has_cuda:
    problems.append("fastsgd._C was built without its CUDA kernels")
if not torch.cuda.is_available():
    problems.append("no CUDA device (torch.cuda.is_available() is False)")
elif _C.cuda_device_count() == 0:
    problems.append("fastsgd._C's CUDA runtime sees no device")
for p in problems:
    print("FAIL:", p)
sys.exit(1 if problems else 0)
EOF

# ---- correctness first, then speed ---------------------------------------------------------
if want cuda; then
  run_tests cuda_backend "$LIMIT_CUDA" tests/kernels/test_cuda_backend.py tests/kernels/test_gpu_backends.py \
    -k "not emulated and not triton and not compile"
fi
if want triton; then
  run_tests triton "$LIMIT_TRITON" tests/kernels/test_gpu_backends.py tests/kernels/test_contract.py \
    -k "triton and not compile or test_contract"
fi
if want ghost_bn; then
  run_tests ghost_bn "$LIMIT_GHOST_BN" tests/nn/test_ghost_bn.py -k "triton or gpu"
fi
if want bench; then
  # LARS/LAMB on triton and cuda run twice in one round-robin: fastsgd-<gpu> (small tensors' norms and
  # update in one launch) and fastsgd-<gpu>-2pass (FASTSGD_GPU_TWO_PASS=1); the vs_2pass and launches
  # columns say whether the fused path and its size (one program/block, 16384 elements) pay.
  stage bench_optimizer "$LIMIT_BENCH_OPTIM" "$out/optimizer_step_${gpu}.json" \
    python3 bench/optimizer_step.py --device cuda --launches --reps 10 --out "$out/optimizer_step_${gpu}.json"
  stage bench_ghost_bn "$LIMIT_BENCH_GHOST_BN" "$out/ghost_bn_${gpu}.json" \
    python3 bench/ghost_bn.py --device cuda --out "$out/ghost_bn_${gpu}.json"
fi

table
exit "$failed"
