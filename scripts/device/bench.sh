#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz", ".whl"]): our engine benchmark and the
# PyTorch anchor (shared/anchors/torch_musetalk_bench.py, channels-last) in the same call, then a
# side-by-side table ($OUT/summary.txt; reports and logs as one archive, $OUT/bench.tgz, since the
# device returns at most 8 files). BATCHES / STAGES / RUNS / ANCHOR_BATCHES / ANCHOR_MODES (empty: no anchor) / MEMORY
# override the defaults. BASELINE=path/to/an/older/lipstream: the same benchmark with that binary first, on the
# same warm card, and a change table.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/bench}
mkdir -p "$out"
status=0
batches=${BATCHES:-1,2,4,8,16}
stages=${STAGES:-avatar,camera,unet,vae-decode,vae-encode,whisper}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if [ -n "${BASELINE:-}" ]; then
  "$BASELINE" bench engine --batches "$batches" --stages "$stages" --runs "${RUNS:-50}" --profile \
    --out "$out/baseline_engine.json" > /dev/null 2> "$out/baseline_engine.log" || status=1
fi
./.device/bin/lipstream bench engine --batches "$batches" --stages "$stages" --runs "${RUNS:-50}" --profile \
  --out "$out/lipstream_engine.json" > /dev/null 2> "$out/lipstream_engine.log"
[ $? -eq 0 ] || status=1
tail -40 "$out/lipstream_engine.log"
# MEMORY=1: the avatar engine alone, for its device memory (every profile, graphs captured).
if [ "${MEMORY:-0}" = 1 ]; then
  ./.device/bin/lipstream bench engine --stages avatar --batches "$batches" --runs 5 \
    --out "$out/lipstream_avatar_memory.json" > /dev/null 2> "$out/lipstream_avatar_memory.log" || status=1
fi
# scripts/device/build.sh copies the shared anchor here (the device sees only this checkout).
anchor=${ANCHOR:-.device/anchors/torch_musetalk_bench.py}
if [ -n "${ANCHOR_MODES-graph,compile}" ] && [ -f "$anchor" ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  python3 "$anchor" --channels-last --batches "${ANCHOR_BATCHES:-1,16}" --modes "${ANCHOR_MODES-graph,compile}" \
    --out "$out/torch_musetalk.json" > "$out/torch.log" 2>&1 || status=1
  tail -5 "$out/torch.log"
fi
python3 scripts/device/compare.py "$out/lipstream_engine.json" "$out/torch_musetalk.json" \
  "$out/lipstream_avatar_memory.json" | tee "$out/summary.txt"
if [ -f "$out/baseline_engine.json" ]; then
  python3 scripts/device/ab.py "$out/baseline_engine.json" "$out/lipstream_engine.json" | tee -a "$out/summary.txt"
fi
archive_reports "$out" bench.tgz
exit "$status"
