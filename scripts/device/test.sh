#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device"]): doctor, then every GPU-vs-CPU op test.
# Writes the full logs under $OUT and ends with a short table.
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
./.device/bin/lipstream doctor 2>&1 | tee "$out/doctor.txt"
./.device/bin/gpu_ops --nocapture --test-threads=1 2>&1 | tee "$out/gpu_ops.txt"
status=${PIPESTATUS[0]}
echo "---"
grep -E "relative L2|test result" "$out/gpu_ops.txt"
exit "$status"
