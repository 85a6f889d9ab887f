#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): doctor, every CUDA-vs-CPU op and
# tiny-model test, the camera face path against the CPU's, then the full-size check of the CUDA
# executor against the CPU executor.
# Writes the full logs under $OUT and ends with a short table.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export LIPSTREAM_FIXTURES=$PWD/tests/fixtures/tiny
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
./.device/bin/lipstream doctor 2>&1 | tee "$out/doctor.txt"
./.device/bin/gpu_ops --nocapture --test-threads=1 2>&1 | tee "$out/gpu_ops.txt"
status=${PIPESTATUS[0]}
# EXPERIMENTS=1: the op sweep again with every experimental kernel choice on (gpu/src/kernels:
# `Experiment`), which are off by default until measured.
if [ "${EXPERIMENTS:-0}" = 1 ]; then
  env $(experiment_vars | sed 's/$/=1/') ./.device/bin/gpu_ops --nocapture --test-threads=1 \
    > "$out/gpu_ops_experiments.txt" 2>&1 || status=1
  grep -E "mma|norm -> conv|test result|panicked" "$out/gpu_ops_experiments.txt" | tail -20
fi
./.device/bin/gpu_faces --nocapture 2>&1 | tee "$out/gpu_faces.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
if [ "${FULL_CHECK:-1}" = 1 ]; then
  ./.device/bin/lipstream engine check > "$out/engine_check.json" 2> "$out/engine_check.log"
  [ $? -eq 0 ] || status=1
fi
echo "---"
grep -E "rel L2|test result|panicked" "$out/gpu_ops.txt" | tail -60
grep -E "plane|test result|panicked" "$out/gpu_faces.txt"
cat "$out/engine_check.log" 2>/dev/null | grep "rel L2"
exit "$status"
