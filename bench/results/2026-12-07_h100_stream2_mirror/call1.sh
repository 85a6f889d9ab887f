#!/usr/bin/env bash
# Device call 1 of the seventeenth session (carry [".device/pack.tar.xz"]): the streamed group
# norm's second form and the mirrored passes against the CPU executor, then one avatar engine
# with the serving profiles, and every experiment off/on on it at B=1 and B=24.
set -uo pipefail
cd "$(dirname "$0")/../../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export LIPSTREAM_FIXTURES=$PWD/tests/fixtures/tiny
out=${OUT:-/tmp/call1}
mkdir -p "$out"
# Everything printed below also goes to summary.txt; the rest leaves as one archive at the end
# (the device returns at most 8 files).
exec > >(tee -a "$out/summary.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
timeout 120 ./.device/bin/gpu_ops streamed_group_norms_match --nocapture --test-threads=1 > "$out/ops_streamed.txt" 2>&1
echo "streamed numerics rc=$? ($(( $(date +%s) - t0 )) s)"
grep -E "rel L2|test result|panicked" "$out/ops_streamed.txt" | tail -20
t1=$(date +%s)
LIPSTREAM_MIRROR_PASSES=1 timeout 150 ./.device/bin/gpu_ops fused_epilogues_and_layouts_match upsampling_convolutions_match \
  norms_attention_and_linears_match --nocapture --test-threads=1 > "$out/ops_mirror.txt" 2>&1
echo "mirror numerics rc=$? ($(( $(date +%s) - t1 )) s)"
grep -E "test result|panicked" "$out/ops_mirror.txt" | tail -8
t2=$(date +%s)
./.device/bin/lipstream engine build --mode avatar --batches 1,2,4,8,16,24 --out /tmp/avatar.engine \
  > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t2 )) s"
OUT=$out/ab ENGINE=/tmp/avatar.engine BENCH_BATCHES=1,24 STAGES=avatar RUNS=20 ROUNDS=1 \
  VARS=LIPSTREAM_GN_STREAM,LIPSTREAM_MIRROR_PASSES,LIPSTREAM_NORMED_LOADS9 ./scripts/device/env_ab.sh
# Then 24 avatar sessions on the same engine, the default against each experiment that held
# its numerics, as long as the call has time left (the device stops a call at 600 s).
variants="base:"
grep -q "test result: ok" "$out/ops_streamed.txt" && variants+=";stream:LIPSTREAM_GN_STREAM=1"
grep -q "test result: ok" "$out/ops_mirror.txt" && variants+=";mirror:LIPSTREAM_MIRROR_PASSES=1"
left=$(( 560 - ($(date +%s) - t0) ))
per=45
n=$(( left / per ))
if [ "$n" -ge 1 ]; then
  variants=$(echo "$variants" | tr ';' '\n' | head -n "$n" | paste -sd ';')
  echo "serving: $variants ($left s left)"
  OUT=$out/serve MODE=avatar SESSIONS=24 DURATION=12 REUSE_ENGINE=1 VARIANTS="$variants" \
    timeout $(( left - 5 )) ./scripts/device/serve_ab.sh > /dev/null 2>&1
  cat "$out/serve/summary.txt" 2>/dev/null | grep -E "^==|late|batch|glass" | head -40
fi
echo "total $(( $(date +%s) - t0 )) s"
archive_reports "$out" call1.tgz
