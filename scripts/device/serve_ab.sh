#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): one full-size engine for
# MODE (avatar), then, for each variant of VARIANTS ("name:serve flags" separated by ";", e.g.
# "wait0:--whisper-wait-ms 0;wait8:--whisper-wait-ms 8"; leading VAR=value words go to the
# server's environment, e.g. "prio:LIPSTREAM_FRAME_PRIORITY=1"), a server with those flags driven by
# `lipstream bench sessions` at each load of SESSIONS (24) for DURATION (12 s), ROUNDS (1) times
# over, variants alternating within a round: server settings compared under the same loads on
# the same warm card. Summaries under $OUT (<name>_<N>_<round>.txt) with the renderer's and
# whisper's /metrics; reports, server logs and metrics in one archive.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
mode=${MODE:-avatar}
source scripts/device/serve_lib.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
build_engine || exit 1
# Everything below also goes to summary.txt (returned beside the archive).
exec > >(tee -a "$out/summary.txt") 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,temperature.gpu,power.draw,utilization.gpu --format=csv -l 5 \
  > "$out/gpu_clocks.csv" 2>/dev/null &
smi=$!
status=0
IFS=';' read -r -a variants <<< "${VARIANTS:-wait0:--whisper-wait-ms 0}"
for round in $(seq 1 "${ROUNDS:-1}"); do
  for v in "${variants[@]}"; do
    name=${v%%:*}
    envs=(); args=()
    for word in ${v#*:}; do
      if [ ${#args[@]} -eq 0 ] && [[ $word =~ ^[A-Z_0-9]+= ]]; then envs+=("$word"); else args+=("$word"); fi
    done
    SERVE_ENV="${envs[*]}" SERVE_ARGS="${args[*]}" serve 0 "$out/serve_${name}_$round.log" || { status=1; continue; }
    for n in $(echo "${SESSIONS:-24}" | tr , ' '); do
      tag=${name}_${n}_$round
      $bin bench sessions --url http://127.0.0.1:8080 --sessions "$n" --duration "${DURATION:-12}" \
        "${bench_mode[@]}" --out "$out/$tag" > "$out/$tag.txt" 2>&1 || status=1
      metrics > "$out/metrics_$tag.txt" 2>/dev/null
      echo "== $name (${v#*:}), $n sessions, round $round"
      grep -v -e "^wrote" -e OpenH264 "$out/$tag.txt"
      grep -E "^lipstream_(gpu_load_ratio|whisper_(windows_(sum|count)|seconds_total)|batch_frames_(sum|count)|frames_late_total|frames_rendered_total|stage_seconds_sum\{stage=\"render_batch\")" \
        "$out/metrics_$tag.txt" | tr '\n' ' '; echo
    done
    stop
    grep -E "ERROR|WARN" "$out/serve_${name}_$round.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -5
  done
done
kill "$smi" 2>/dev/null
archive_reports "$out" serve_ab.tgz
exit "$status"
