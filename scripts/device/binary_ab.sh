#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): a change between two
# lipstream binaries timed on ONE engine file. Each binary building its own engine (bench.sh
# BASELINE=) mixes the change with the build's timed choices, which differ from build to build
# by about 1 % of a B=16 frame. Builds the camera engine with the current binary, then times it
# with BASELINE (default .device/base/lipstream, packed by build.sh) and the current binary
# alternately, ROUNDS times. The baseline must read the file: it ignores decisions it does not
# know and runs its own path there, which is the comparison wanted.
#   BASELINE=.device/base/lipstream ROUNDS=2 STAGES=avatar,camera BATCHES=1,16 RUNS=30
# Writes the change tables to $OUT/summary.txt and the reports (with per-step profiles) and logs
# as $OUT/binary_ab.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/binary_ab}
mkdir -p "$out"
base=${BASELINE:-.device/base/lipstream}
engine=/tmp/binary_ab.engine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
./.device/bin/lipstream engine build --mode camera --batches "${BATCHES:-1,16}" --out "$engine" \
  > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t0 )) s"
status=0
bench() { # bench BINARY NAME: one timing of the engine file, the report under $out/NAME.json
  "$1" bench engine --engine "$engine" --stages "${STAGES:-avatar,camera}" --runs "${RUNS:-30}" \
    --profile --out "$out/$2.json" > /dev/null 2> "$out/$2.log" || { status=1; tail -5 "$out/$2.log"; }
}
for r in $(seq 1 "${ROUNDS:-2}"); do
  bench "$base" "base_$r"
  bench ./.device/bin/lipstream "new_$r"
  { echo "round $r: $base -> this build"
    python3 scripts/device/ab.py "$out/base_$r.json" "$out/new_$r.json" | grep -v per_frame
  } | tee -a "$out/summary.txt"
done
archive_reports "$out" binary_ab.tgz
exit "$status"
