#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): what an experiment the
# engine BUILD reads (a gpu/src/kernels `Experiment` whose effect the engine file records)
# changes; switches read at load time go through env_ab.sh instead. Builds the
# full-size random-weight engine twice, with every experiment off and with VAR=1, then times
# the two files alternately ROUNDS times with every experiment off, so drift of the card's
# clocks lands on both sides alike. The difference mixes the experiment with the build's timed
# choices, which move about 1 % of a B=16 frame from build to build.
#   VAR=LIPSTREAM_<SWITCH> MODE=avatar BATCHES=1,24 STAGES=avatar ROUNDS=2 RUNS=30
# (bench/results/2026-12-08_h100_cold_tune: the build's timings with cold weights, measured and
# removed.) The engine files stay at /tmp/build_ab_{off,on}.engine for later calls on the same machine.
# Writes the change tables to $OUT/summary.txt and the reports and logs as $OUT/build_ab.tgz.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/build_ab}
mkdir -p "$out"
bin=./.device/bin/lipstream
var=${VAR:?VAR names the build-time switch to compare}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for v in $(experiment_vars); do unset "$v"; done
for side in off on; do
  t0=$(date +%s)
  env $([ "$side" = on ] && echo "$var=1") $bin engine build --mode "${MODE:-avatar}" \
    --batches "${BATCHES:-1,24}" --out "/tmp/build_ab_$side.engine" > "$out/engine_build_$side.log" 2>&1 \
    || { tail -20 "$out/engine_build_$side.log"; exit 1; }
  echo "engine build, $var $side: $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
done
status=0
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in off on; do
    $bin bench engine --engine "/tmp/build_ab_$side.engine" --stages "${STAGES:-avatar}" \
      --runs "${RUNS:-30}" --profile --out "$out/${side}_$r.json" > /dev/null 2> "$out/${side}_$r.log" \
      || { status=1; tail -5 "$out/${side}_$r.log"; }
  done
  { echo "$var at build, round $r: off -> on"
    python3 scripts/device/ab.py "$out/off_$r.json" "$out/on_$r.json" | grep -v per_frame
  } | tee -a "$out/summary.txt"
done
archive_reports "$out" build_ab.tgz
exit "$status"
