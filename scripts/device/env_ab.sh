#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): what one environment
# variable of the engine changes, on one engine file. Builds the full-size random-weight camera
# engine once (its choices then hold for both sides), then times STAGES with VAR=A and VAR=B
# alternately, ROUNDS times each, so drift of the card's clocks lands on both sides alike.
#   VAR=LIPSTREAM_PDL A=0 B=1 ROUNDS=2 STAGES=avatar,camera BATCHES=1,16 RUNS=50
# Writes every report under $OUT and ends with a change table per round (A first, then B).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp}
bin=./.device/bin/lipstream
var=${VAR:-LIPSTREAM_PDL} a=${A:-0} b=${B:-1}
engine=/tmp/ab.engine
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
t0=$(date +%s)
$bin engine build --mode camera --batches "${BATCHES:-1,16}" --out "$engine" > "$out/engine_build.log" 2>&1 \
  || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t0 )) s"
status=0
for r in $(seq 1 "${ROUNDS:-2}"); do
  for side in a b; do
    value=$a; [ $side = b ] && value=$b
    env "$var=$value" $bin bench engine --engine "$engine" --stages "${STAGES:-avatar,camera}" \
      --runs "${RUNS:-50}" --out "$out/${side}_$r.json" > /dev/null 2> "$out/${side}_$r.log" \
      || { status=1; tail -5 "$out/${side}_$r.log"; }
  done
  echo "round $r: $var=$a -> $var=$b"
  python3 scripts/device/ab.py "$out/a_$r.json" "$out/b_$r.json" | grep -v per_frame
done
exit "$status"
