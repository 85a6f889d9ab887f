#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): what experiments (the
# engine's environment switches, gpu/src/kernels `EXPERIMENTS`) change, on one engine file.
# Builds the full-size random-weight engine once (camera mode, which holds the avatar stages
# too; MODE=avatar builds only those, faster), so its timed choices hold for every side; then
# times STAGES with every experiment off and with one of VARS set to 1, alternately, ROUNDS
# times each, so drift of the card's clocks lands on both sides alike.
#   VARS=LIPSTREAM_PDL,LIPSTREAM_NORM_COLS ROUNDS=2 STAGES=avatar,camera BATCHES=1,16 RUNS=50
# ENGINE=/tmp/avatar.engine times an engine file an earlier script of the same call built
# instead of building one; BENCH_BATCHES=1,24 times only those of its profiles.
# An experiment the build decides by timing must be on during the build too, so that the engine
# file holds its decision: BUILD_VARS=LIPSTREAM_X,LIPSTREAM_Y. The off side then ignores those
# decisions.
# Writes the change tables (one per experiment and round) to $OUT/summary.txt and the reports
# and logs as one archive, $OUT/env_ab.tgz (the device returns at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/env_ab}
mkdir -p "$out"
bin=./.device/bin/lipstream
engine=${ENGINE:-/tmp/ab.engine}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# Every side starts from all experiments off.
for v in $(experiment_vars); do unset "$v"; done
t0=$(date +%s)
if [ -n "${ENGINE:-}" ] && [ -f "$ENGINE" ]; then
  echo "engine: reusing $ENGINE (its own profiles)"
else
  env $(echo "${BUILD_VARS:-}" | tr , '\n' | sed '/^$/d; s/$/=1/') \
    $bin engine build --mode "${MODE:-camera}" --batches "${BATCHES:-1,16}" --out "$engine" > "$out/engine_build.log" 2>&1 \
    || { tail -20 "$out/engine_build.log"; exit 1; }
  echo "engine build: $(( $(date +%s) - t0 )) s"
fi
status=0
bench() { # bench NAME [VAR=1]: one timing of the engine file, the report under $out/NAME.json
  env ${2:+"$2"} $bin bench engine --engine "$engine" --stages "${STAGES:-avatar,camera}" ${BENCH_BATCHES:+--batches "$BENCH_BATCHES"} \
    --runs "${RUNS:-50}" --profile --out "$out/$1.json" > /dev/null 2> "$out/$1.log" \
    || { status=1; tail -5 "$out/$1.log"; }
}
for var in $(echo "${VARS:-LIPSTREAM_PDL}" | tr , ' '); do
  for r in $(seq 1 "${ROUNDS:-2}"); do
    bench "${var}_off_$r"
    bench "${var}_on_$r" "$var=1"
    { echo "$var, round $r: off -> on"
      python3 scripts/device/ab.py "$out/${var}_off_$r.json" "$out/${var}_on_$r.json" | grep -v per_frame
    } | tee -a "$out/summary.txt"
  done
done
archive_reports "$out" env_ab.tgz
exit "$status"
