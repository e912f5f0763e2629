#!/usr/bin/env bash
# One GPU session's worth of evidence, in one command: build, check, time, and keep the outputs.
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]        # default benchmarks/results/<date>-<gpu>/
#
# Expects torch with CUDA and triton installed, the released weights in MSFIN_WEIGHTS_DIR and
# Set5/Set14 in MSFIN_DATA_DIR (or ../shared). Writes: environment.txt, gpu-tests.txt (pytest -m gpu),
# latency-*.json/.md/.png (benchmarks/latency.py), and the exit status of each step; a failing
# step does not stop the later ones, so one run yields everything it can.
set -uo pipefail
cd "$(dirname "$0")/.."

gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo none)
out=${1:-benchmarks/results/$(date -u +%Y-%m-%d)-$gpu}
mkdir -p "$out"
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__)"
  python -m msfin_fast info
} > "$out/environment.txt" 2>&1

run() {  # run NAME CMD...: log to $out/NAME.txt, remember the exit status
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "$name exit $rc" | tee -a "$out/status.txt"
  [ $rc -eq 0 ] || status=1
}

run build pip install --no-build-isolation -e . -q
run gpu-tests python -m pytest -m gpu -v -rs --tb=short
run latency-quick python benchmarks/latency.py --quick --out-dir "$out" --name latency-quick
run latency python benchmarks/latency.py --out-dir "$out" --name latency --backends ref-fp32 ref-fp16-cl \
    engine-fp16 engine-fp32 engine-fp16-graph engine-fp32-graph engine-fp16-fused engine-fp16-fused-graph \
    engine-fp16-cudnn-graph cuda-fp16 cuda-fp16-graph cuda-fp32 auto-fp16-graph
run latency-compile python benchmarks/latency.py --out-dir "$out" --name latency-compile --backends compile \
    --sizes 180x320 --batch 1
exit $status
