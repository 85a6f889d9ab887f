#!/usr/bin/env bash
# Runs on a multi-GPU machine (device tool, kind nvidia-h200-x2, carry [".device/pack.tar.xz"]): does one
# lipstream server use two GPUs as well as one? Builds the full-size random-weight engine once
# (GPU 0; the GPUs are the same model), then
#   1. serves it on GPU 0 alone and ramps (`bench sessions --ramp`) to N, the largest session
#      count it sustains (<= 1 % late; camera also p95 <= RAMP_BUDGET), unless N is given;
#   2. runs N sessions on GPU 0 alone for DURATION s: one GPU's delivered frames per second;
#   3. serves it on GPUS (0,1) and runs 2N sessions for DURATION s, recording how the sessions
#      were placed (`lipstream_gpu_sessions`) and each GPU's frames.
# Passes when the two GPUs deliver >= 90 % of twice one GPU's frames per second and their late
# share is within one point of one GPU's. MODE (avatar), N, DURATION (20), BUDGET (80), HOP (2),
# BATCHES (1,2,4,8,16), GPUS (0,1), RAMP_BUDGET (300), RAMP_DURATION (8).
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
mode=${MODE:-avatar}
gpus=${GPUS:-0,1}
source scripts/device/serve_lib.sh
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
build_engine || exit 1

# "fps late_pct" of a sessions.json.
figures() { python3 -c '
import json,sys
o=json.load(open(sys.argv[1]))["overall"]
print(o["fps_delivered_total"], o["late_pct"])' "$1"; }

serve 0 "$out/serve_1gpu.log" || exit 1
n=${N:-}
if [ -z "$n" ]; then
  $bin bench sessions --url http://127.0.0.1:8080 --sessions 1 --ramp --budget-ms "${RAMP_BUDGET:-300}" \
    --duration "${RAMP_DURATION:-8}" "${bench_mode[@]}" --out "$out/ramp_1gpu" > "$out/ramp_1gpu.txt" 2>&1
  grep -E "^ramp:|sustainable|sessions per" "$out/ramp_1gpu.txt"
  n=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sustainable_sessions"] or 0)' \
    "$out/ramp_1gpu/sessions.json" 2>/dev/null)
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "no sustainable count from the ramp"; stop; exit 1; }
fi
echo "one GPU sustains $n sessions; two get $((2 * n))"
$bin bench sessions --url http://127.0.0.1:8080 --sessions "$n" --duration "${DURATION:-20}" \
  "${bench_mode[@]}" --out "$out/one_gpu" > "$out/one_gpu.txt" 2>&1
grep -v -e "^wrote" -e OpenH264 "$out/one_gpu.txt"
metrics > "$out/metrics_one_gpu.txt" 2>/dev/null
stop

serve "$gpus" "$out/serve_2gpu.log" || exit 1
grep -E "renderer ready" "$out/serve_2gpu.log" | sed 's/\x1b\[[0-9;]*m//g'
$bin bench sessions --url http://127.0.0.1:8080 --sessions "$((2 * n))" --duration "${DURATION:-20}" \
  "${bench_mode[@]}" --out "$out/two_gpus" > "$out/two_gpus.txt" 2>&1 &
bench=$!
# Placement while the sessions run.
sleep $(( ${DURATION:-20} / 2 + 3 ))
metrics > "$out/metrics_two_gpus_mid.txt" 2>/dev/null
grep -E "^lipstream_gpu_(sessions|load_ratio|busy_ratio|late_ratio)" "$out/metrics_two_gpus_mid.txt"
wait $bench
grep -v -e "^wrote" -e OpenH264 "$out/two_gpus.txt"
metrics > "$out/metrics_two_gpus.txt" 2>/dev/null
grep -E "^lipstream_gpu_frames_rendered_total" "$out/metrics_two_gpus.txt"
stop

read -r fps1 late1 < <(figures "$out/one_gpu/sessions.json")
read -r fps2 late2 < <(figures "$out/two_gpus/sessions.json")
python3 - "$fps1" "$late1" "$fps2" "$late2" "$n" <<'EOF' > "$out/verdict.txt"
import sys
fps1, late1, fps2, late2 = map(float, sys.argv[1:5]); n = int(sys.argv[5])
ratio = fps2 / (2 * fps1) if fps1 else 0.0
ok = ratio >= 0.9 and late2 <= late1 + 1.0
print(f"one GPU, {n} sessions: {fps1:.1f} fps delivered, {late1:.2f} % late")
print(f"two GPUs, {2*n} sessions: {fps2:.1f} fps delivered, {late2:.2f} % late")
print(f"two GPUs deliver {ratio:.3f} x twice one GPU: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
status=$?
cat "$out/verdict.txt"
# The device returns at most 8 files: reports, logs and metrics travel as one archive.
(cd "$out" && tar -czf multi_gpu.tgz $(ls -d ramp_1gpu* one_gpu* two_gpus* serve_*.log metrics_* engine_build.log 2>/dev/null) \
  && rm -rf ramp_1gpu* one_gpu* two_gpus* serve_*.log metrics_* engine_build.log)
exit "$status"
