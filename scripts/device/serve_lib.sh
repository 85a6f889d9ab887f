# Sourced by sessions.sh and multi_gpu.sh on the GPU machine: MODE's serve and bench arguments,
# the full-size engine build, a `lipstream serve` on given GPUs, and its /metrics. Expects to
# run from the repository root.
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/lipstream_device}
mkdir -p "$out"
bin=./.device/bin/lipstream
# Camera: every session publishes the astronaut photo (a real face for MTCNN) and a click train.
# Avatar: the server shows AVATAR; each session speaks a tone with a click train over it.
case "$mode" in
  camera) serve_mode=(--mtcnn tests/fixtures/mtcnn); bench_mode=(--media tests/fixtures/mtcnn/astronaut.png) ;;
  avatar) serve_mode=(--avatar "${AVATAR:-.device/avatar.safetensors}"); bench_mode=(--mode avatar) ;;
  *) echo "MODE is camera or avatar, not $mode"; exit 2 ;;
esac
# The default avatar, when none was carried: the astronaut photo prepared with the tiny model,
# whose latents have the full model's shape (all the engine looks at).
if [ "$mode" = avatar ] && [ -z "${AVATAR:-}" ] && [ ! -f .device/avatar.safetensors ]; then
  $bin avatar prepare --image tests/fixtures/mtcnn/astronaut.png --models tests/fixtures/tiny \
    --mtcnn tests/fixtures/mtcnn --executor cpu --out .device/avatar.safetensors \
    > "$out/avatar_prepare.log" 2>&1 || tail -5 "$out/avatar_prepare.log"
fi
engine=/tmp/$mode.engine
t0=$(date +%s)

# The engine for MODE at BATCHES (default: the mode's own), built on GPU 0 (the log under $out); REUSE_ENGINE=1 keeps
# one an earlier call on this warm machine built.
build_engine() {
  if [ "${REUSE_ENGINE:-0}" = 1 ] && [ -f "$engine" ]; then
    echo "engine: reusing $engine"; return 0
  fi
  $bin engine build --mode "$mode" ${BATCHES:+--batches "$BATCHES"} --out "$engine" \
    > "$out/engine_build.log" 2>&1 || { tail -20 "$out/engine_build.log"; return 1; }
  echo "engine build: $(( $(date +%s) - t0 )) s"
}

server=""
# serve GPUS LOG: starts the server on those GPUs (with SERVE_ARGS, and SERVE_ENV's VAR=value
# words in its environment) and waits until it listens. BUDGET and HOP set the frame budget and
# the whisper hop unless SERVE_ARGS names them itself (the server takes each flag once).
serve() {
  local defaults=()
  [[ " ${SERVE_ARGS:-} " == *" --frame-budget-ms "* ]] || defaults+=(--frame-budget-ms "${BUDGET:-80}")
  [[ " ${SERVE_ARGS:-} " == *" --audio-hop-frames "* ]] || defaults+=(--audio-hop-frames "${HOP:-2}")
  env ${SERVE_ENV:-} RUST_LOG="${SERVE_LOG:-info}" $bin serve --http 127.0.0.1:8080 --udp-port 0 --ice-addrs 127.0.0.1 \
    --engine "$engine" "${serve_mode[@]}" --max-sessions 128 "${defaults[@]}" \
    --gpus "$1" ${SERVE_ARGS:-} > "$2" 2>&1 &
  server=$!
  for _ in $(seq 1 300); do
    grep -q "lipstream listening" "$2" && return 0
    kill -0 $server 2>/dev/null || { tail -20 "$2"; return 1; }
    sleep 1
  done
  echo "server on GPUs $1 did not start"; return 1
}
stop() { kill $server 2>/dev/null; wait $server 2>/dev/null; }
metrics() { python3 -c 'import urllib.request,sys; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:8080/metrics").read().decode())'; }
