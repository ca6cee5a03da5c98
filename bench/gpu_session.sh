#!/usr/bin/env bash
# Everything a GPU session has to check, most important first: build, GPU
# tests, the optimizer-step benchmark, the ghost-BN benchmark. Each stage has
# its own time limit (all together under the device tool's 600 s per call), so
# a short session still brings back the stages that finished. Logs and result
# rows go to $OUT (the device tool returns that folder), else to ./gpu_out.
#
#   bash bench/gpu_session.sh                 # all stages, from the repository root
#   bash bench/gpu_session.sh tests bench     # chosen stages (build is kept between warm calls)
#
# Afterwards: copy $OUT/*.json to bench/results/, set AUTO_ORDER["cuda"] in
# fastsgd/backends.py from the optimizer rows (the faster of triton/cuda per
# layout), and put the tables in the issue note.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu_out}"
mkdir -p "$out"
summary="$out/summary.txt"

stage() {  # stage NAME SECONDS COMMAND...: run under a limit, log, record rc and duration
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  printf '%-16s rc=%-3s %4ss  (limit %ss)\n' "$name" "$rc" "$((SECONDS - t0))" "$limit" | tee -a "$summary"
  return $rc
}

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr ' ' '_' | tr -cd '[:alnum:]_-')
gpu=${gpu:-unknown_gpu}
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
git rev-parse HEAD > "$out/commit.txt" 2>/dev/null

# One architecture, the one present: half the nvcc time of the default 80;90.
arch=$(python -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null)
export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${arch:-90}"
want() { local s; for s in "${stages[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
stages=("$@")
if [ "${#stages[@]}" -eq 0 ]; then stages=(build tests bench); fi

if want build; then
  stage build 150 pip install --no-build-isolation --no-deps -e . || { echo "build failed: see $out/build.log"; exit 1; }
  stage backends 30 python -c "import fastsgd, fastsgd._C as c, torch; print(torch.__version__, torch.version.cuda, \
c.has_cuda, c.cuda_runtime_version(), c.cuda_device_count()); print(fastsgd.available_backends())"
fi
if want tests; then
  # `pytest` (not python -m pytest): the checkout must not shadow the built module.
  stage tests 220 pytest -q -ra --durations=15 --junitxml="$out/gpu_tests.xml" \
    -k "not emulated" tests/test_cuda_backend.py tests/test_gpu_optim.py tests/test_ghost_bn.py
fi
if want bench; then
  stage optimizer_step 150 python bench/optimizer_step.py --device cuda --launches \
    --out "$out/optimizer_step_${gpu}.json"
  stage ghost_bn 40 python bench/ghost_bn.py --device cuda --out "$out/ghost_bn_${gpu}.json"
fi
