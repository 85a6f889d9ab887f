#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]), one call of ~8 minutes:
# 1. the streamed group norm against the CPU executor with its default units (4 MiB) and with
#    2 MiB ones (slices of 16 channels);
# 2. one avatar engine with the serving profiles (1, 2, 4, 8, 16, 24);
# 3. `LIPSTREAM_GN_STREAM` off/on at B=24 for each "UNIT:WINDOW" of WINDOWS (MiB; default
#    "4:8 4:12 2:8": the form's units and the bytes of them between their two reads);
# 4. as long as the call has time left: SESSIONS (16,24) avatar sessions without and with
#    `--hold-batches`.
# Prints everything to $OUT/summary.txt; the rest leaves as one archive (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export LIPSTREAM_FIXTURES=$PWD/tests/fixtures/tiny
out=${OUT:-/tmp/norm_windows_and_hold}
mkdir -p "$out"
exec > >(tee -a "$out/summary.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
limit=${LIMIT_S:-540}
for unit in 4 2; do
  LIPSTREAM_GN_STREAM_UNIT_MIB=$unit timeout 120 ./.device/bin/gpu_ops streamed_group_norms_match --nocapture \
    --test-threads=1 > "$out/ops_unit$unit.txt" 2>&1
  echo "streamed numerics, $unit MiB units: rc=$?"
  grep -E "streamed graph rel L2|test result|panicked" "$out/ops_unit$unit.txt" | tail -8
done
t1=$(date +%s)
./.device/bin/lipstream engine build --mode avatar --batches 1,2,4,8,16,24 --out /tmp/avatar.engine \
  > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t1 )) s"
for w in ${WINDOWS:-4:8 4:12 2:8}; do
  echo "== streamed norms, ${w%%:*} MiB units, ${w##*:} MiB between their reads"
  LIPSTREAM_GN_STREAM_UNIT_MIB=${w%%:*} LIPSTREAM_GN_STREAM_WINDOW_MIB=${w##*:} OUT=$out/w${w/:/_} \
    ENGINE=/tmp/avatar.engine BENCH_BATCHES=24 STAGES=avatar RUNS=20 ROUNDS=1 VARS=LIPSTREAM_GN_STREAM \
    ./scripts/device/env_ab.sh | grep -E "avatar_frame|round"
done
left=$(( limit - ($(date +%s) - t0) ))
if [ "$left" -ge 100 ]; then
  echo "serving ($left s left)"
  OUT=$out/serve MODE=avatar SESSIONS=${SESSIONS:-16,24} DURATION=12 REUSE_ENGINE=1 \
    VARIANTS="base:;hold:--hold-batches" timeout $(( left - 5 )) ./scripts/device/serve_ab.sh > /dev/null 2>&1
  grep -E "^==|late|batch" "$out/serve/summary.txt" 2>/dev/null | head -24
fi
echo "total $(( $(date +%s) - t0 )) s"
archive_reports "$out" reports.tgz
