#!/usr/bin/env bash
# Device call 2 of the seventeenth session (carry [".device/pack.tar.xz"]): the streamed group
# norm's third form (only norms larger than L2, slices of 32 channels or more, normalisations
# half the window behind) against the CPU executor; one avatar engine with the serving
# profiles; the form off/on at B=24 (its default lead, then the whole window as in call 1);
# then 24 avatar sessions without and with it, as long as the call has time left.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export LIPSTREAM_FIXTURES=$PWD/tests/fixtures/tiny
out=${OUT:-/tmp/call2}
mkdir -p "$out"
exec > >(tee -a "$out/summary.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
timeout 120 ./.device/bin/gpu_ops streamed_group_norms_match --nocapture --test-threads=1 > "$out/ops_streamed.txt" 2>&1
echo "streamed numerics rc=$? ($(( $(date +%s) - t0 )) s)"
grep -E "streamed (eager|graph) rel L2|test result|panicked" "$out/ops_streamed.txt" | tail -14
t2=$(date +%s)
./.device/bin/lipstream engine build --mode avatar --batches 1,2,4,8,16,24 --out /tmp/avatar.engine \
  > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t2 )) s"
OUT=$out/ab ENGINE=/tmp/avatar.engine BENCH_BATCHES=24 STAGES=avatar RUNS=20 ROUNDS=2 \
  VARS=LIPSTREAM_GN_STREAM ./scripts/device/env_ab.sh
echo "== the whole window ahead (LIPSTREAM_GN_STREAM_LEAD_UNITS=5)"
LIPSTREAM_GN_STREAM_LEAD_UNITS=5 OUT=$out/lead5 ENGINE=/tmp/avatar.engine BENCH_BATCHES=24 STAGES=avatar \
  RUNS=20 ROUNDS=1 VARS=LIPSTREAM_GN_STREAM ./scripts/device/env_ab.sh
left=$(( 470 - ($(date +%s) - t0) ))
if [ "$left" -ge 95 ]; then
  echo "serving ($left s left)"
  OUT=$out/serve MODE=avatar SESSIONS=24 DURATION=12 REUSE_ENGINE=1 VARIANTS="base:;stream:LIPSTREAM_GN_STREAM=1" \
    timeout $(( left - 5 )) ./scripts/device/serve_ab.sh > /dev/null 2>&1
  grep -E "^==|late|batch" "$out/serve/summary.txt" 2>/dev/null | head -20
fi
echo "total $(( $(date +%s) - t0 )) s"
archive_reports "$out" call2.tgz
