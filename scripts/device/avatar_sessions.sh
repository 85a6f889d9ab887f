#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device"]): builds the full-size random-weight
# avatar engine, serves it with the avatar bundle AVATAR (default .device/avatar.safetensors,
# made here by `lipstream avatar prepare`; the latents' shape is all the engine needs), and drives
# `lipstream bench sessions --mode avatar` at each load of SESSIONS. The avatar's frames carry no
# stamp: the report counts them (fps) and scrapes the server's rendered / late / batch figures.
set -uo pipefail
cd "$(dirname "$0")/../.."
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp}
bin=./.device/bin/lipstream
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
engine=/tmp/avatar.engine
t0=$(date +%s)
$bin engine build --mode avatar --batches "${BATCHES:-1,2,4,8,16}" --out "$engine" \
  > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; exit 1; }
echo "engine build: $(( $(date +%s) - t0 )) s"
RUST_LOG="${SERVE_LOG:-info}" $bin serve --http 127.0.0.1:8080 --udp-port 0 --ice-addrs 127.0.0.1 \
  --engine "$engine" --avatar "${AVATAR:-.device/avatar.safetensors}" --max-sessions 64 \
  --frame-budget-ms "${BUDGET:-80}" --audio-hop-frames "${HOP:-2}" > "$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
  grep -q "lipstream listening" "$out/serve.log" && break
  kill -0 $server 2>/dev/null || { tail -20 "$out/serve.log"; exit 1; }
  sleep 1
done
echo "server up after $(( $(date +%s) - t0 )) s"
grep -E "renderer ready|lip-sync:" "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g'
status=0
for n in $(echo "${SESSIONS:-1,8,16,24}" | tr , ' '); do
  $bin bench sessions --url http://127.0.0.1:8080 --sessions "$n" --duration "${DURATION:-15}" \
    --mode avatar --out "$out/avatar_$n" > "$out/avatar_$n.txt" 2>&1 || status=1
  grep -v -e "^wrote" -e OpenH264 "$out/avatar_$n.txt"
done
kill $server
wait $server 2>/dev/null
grep -E "ERROR|WARN" "$out/serve.log" | sed 's/\x1b\[[0-9;]*m//g' | sort | uniq -c | sort -rn | head -10
# The device returns a limited number of files: the reports travel as one archive.
tar -C "$out" -czf "$out/avatar_sessions.tgz" $(cd "$out" && ls -d avatar_*/ serve.log 2>/dev/null) \
  && (cd "$out" && rm -rf avatar_*/ serve.log)
exit "$status"
