#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]), one call of ~9 minutes:
# 1. one avatar engine with the serving profiles (1, 2, 4, 8, 16, 24);
# 2. SESSIONS (24,16) avatar sessions without and with `--hold-batches`, ROUNDS (1) times;
# 3. as long as the call has time left (LIMIT_S, 540 s): `LIPSTREAM_GN_STREAM` off/on at B=24 for
#    each "UNIT:WINDOW" of WINDOWS (MiB; default "4:8 4:12": the form's units and the bytes of
#    them between their two reads), then the streamed norm against the CPU executor with 2 MiB
#    units (slices of 16 channels).
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
left() { echo $(( limit - ($(date +%s) - t0) )); }
./.device/bin/lipstream engine build --mode avatar --batches 1,2,4,8,16,24 --out /tmp/avatar.engine \
  > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t0 )) s"
OUT=$out/serve MODE=avatar SESSIONS=${SESSIONS:-24,16} DURATION=12 REUSE_ENGINE=1 ROUNDS=${ROUNDS:-1} \
  VARIANTS="base:;hold:--hold-batches" timeout $(( $(left) - 5 )) ./scripts/device/serve_ab.sh > /dev/null 2>&1
grep -E "^==|late|batch" "$out/serve/summary.txt" 2>/dev/null
for w in ${WINDOWS:-4:8 4:12}; do
  [ "$(left)" -ge 60 ] || break
  echo "== streamed norms, ${w%%:*} MiB units, ${w##*:} MiB between their reads"
  LIPSTREAM_GN_STREAM_UNIT_MIB=${w%%:*} LIPSTREAM_GN_STREAM_WINDOW_MIB=${w##*:} OUT=$out/w${w/:/_} \
    ENGINE=/tmp/avatar.engine BENCH_BATCHES=24 STAGES=avatar RUNS=20 ROUNDS=1 VARS=LIPSTREAM_GN_STREAM \
    timeout $(( $(left) - 5 )) ./scripts/device/env_ab.sh | grep -E "avatar_frame|round"
done
if [ "$(left)" -ge 40 ]; then
  LIPSTREAM_GN_STREAM_UNIT_MIB=2 timeout $(( $(left) - 5 )) ./.device/bin/gpu_ops streamed_group_norms_match \
    --nocapture --test-threads=1 > "$out/ops_unit2.txt" 2>&1
  echo "streamed numerics, 2 MiB units: rc=$?"
  grep -E "streamed graph rel L2|test result|panicked" "$out/ops_unit2.txt" | tail -8
fi
echo "total $(( $(date +%s) - t0 )) s"
archive_reports "$out" reports.tgz
