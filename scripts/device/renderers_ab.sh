#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): one full-size engine
# for MODE (avatar), then for each count in RENDERERS (1,2) a server with that many renderers on
# GPU 0 (`--renderers-per-gpu`) driven by `lipstream bench sessions` at each load of SESSIONS
# (24), DURATION (15 s) each: whether two renderers sharing the GPU, each on its own stream,
# render more frames in time than one. Summaries under $OUT (renderers_<R>_<N>.txt), reports,
# server logs and /metrics in one archive.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
mode=${MODE:-avatar}
source scripts/device/serve_lib.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
build_engine || exit 1
status=0
for r in $(echo "${RENDERERS:-1,2}" | tr , ' '); do
  RENDERERS=$r serve 0 "$out/serve_$r.log" || { status=1; continue; }
  for n in $(echo "${SESSIONS:-24}" | tr , ' '); do
    name=renderers_${r}_$n
    $bin bench sessions --url http://127.0.0.1:8080 --sessions "$n" --duration "${DURATION:-15}" \
      "${bench_mode[@]}" --out "$out/$name" > "$out/$name.txt" 2>&1 || status=1
    echo "== $r renderers, $n sessions"
    grep -v -e "^wrote" -e OpenH264 "$out/$name.txt"
    metrics > "$out/metrics_$name.txt" 2>/dev/null
  done
  stop
  grep -E "ERROR|WARN" "$out/serve_$r.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -5
done
archive_reports "$out" renderers.tgz
exit "$status"
