#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): builds the full-size random-weight
# engine for MODE (camera or avatar), serves it, and drives `lipstream bench sessions` at each
# load of SESSIONS. Camera: every session publishes the astronaut photo (a real face for MTCNN)
# and a click train. Avatar: the server shows AVATAR (default .device/avatar.safetensors, made
# here by `lipstream avatar prepare`; only the latents' shape matters to the engine) and each
# session speaks a tone with a click train over it; the avatar's frames carry no stamp, so they
# are counted, and the returned clicks time the session (audio and video leave with one delay).
# Writes under $OUT: the engine build log, one summary per load, and an archive with the reports,
# the server log and its /metrics after each load. SESSIONS (1,8,16,24), DURATION (20 s), BUDGET
# (frame budget, ms), HOP (frames per whisper window), BATCHES (1,2,4,8,16), GPUS (0; 0,1: one
# renderer per GPU), RAMP (1: also a --ramp run; RAMP_BUDGET, RAMP_DURATION), SERVE_LOG
# (info,lipstream::lipsync=debug adds one line per frame with the preparation's timings).
# The server and engine setup is scripts/device/serve_lib.sh, shared with multi_gpu.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
mode=${MODE:-camera}
source scripts/device/serve_lib.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nproc | tee "$out/cpus.txt"
build_engine || exit 1
$bin engine info "$engine" > "$out/engine_info.txt" 2>&1 && grep -E "kernels|profiles" "$out/engine_info.txt"
serve "${GPUS:-0}" "$out/serve.log" || exit 1
echo "server up after $(( $(date +%s) - t0 )) s"
grep -E "renderer ready|lip-sync:" "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g'
status=0
# GPU clocks, temperature and power every 5 s while the loads run.
nvidia-smi --query-gpu=timestamp,clocks.sm,temperature.gpu,power.draw,utilization.gpu --format=csv -l 5 \
  > "$out/gpu_clocks.csv" 2>/dev/null &
smi=$!
for n in $(echo "${SESSIONS:-1,8,16,24}" | tr , ' '); do
  # A load repeated in SESSIONS gets its own name (10, 10b, 10c).
  name=$n
  while [ -e "$out/${mode}_$name.txt" ]; do name=${name}b; done
  $bin bench sessions --url http://127.0.0.1:8080 --sessions "$n" --duration "${DURATION:-20}" \
    "${bench_mode[@]}" --out "$out/${mode}_$name" > "$out/${mode}_$name.txt" 2>&1 || status=1
  grep -v -e "^wrote" -e OpenH264 "$out/${mode}_$name.txt"
  metrics > "$out/metrics_after_$name.txt" 2>/dev/null
  grep -E "^lipstream_(stage_seconds_(sum|count)|frames_|media_dropped)" "$out/metrics_after_$name.txt" | tr '\n' ' '; echo
done
# RAMP=1: `bench sessions --ramp` from one session up (doubling, then bisecting) to the largest
# count that stays within RAMP_BUDGET ms p95 (camera) and 1 % late frames: sessions per GPU.
if [ "${RAMP:-0}" = 1 ]; then
  $bin bench sessions --url http://127.0.0.1:8080 --sessions 1 --ramp --budget-ms "${RAMP_BUDGET:-300}" \
    --duration "${RAMP_DURATION:-10}" "${bench_mode[@]}" --out "$out/${mode}_ramp" > "$out/${mode}_ramp.txt" 2>&1 || status=1
  grep -E "^ramp:|sustainable|sessions per" "$out/${mode}_ramp.txt"
fi
stop
# With SERVE_LOG=info,lipstream::lipsync=debug: where a session's preparation spends its time.
python3 - "$out/serve.log" <<'PY'
import re, sys, statistics as st
rows = [dict(re.findall(r"(\w+)=(\S+)", re.sub(r"\x1b\[[0-9;]*m", "", l))) for l in open(sys.argv[1]) if "frame submitted" in l]
aud = [float(r["audio_ms"]) for r in rows if r.get("whisper") == "true"]
if aud:
    crop = st.mean(float(r["crop_ms"]) for r in rows)
    print(f"{len(rows)} frames submitted; whisper window {st.mean(aud):.1f} ms mean over {len(aud)}; crop {crop:.1f} ms")
PY
grep -E "ERROR|WARN" "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -10
kill "$smi" 2>/dev/null
archive_reports "$out" sessions.tgz
exit "$status"
