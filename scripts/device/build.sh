#!/usr/bin/env bash
# Builds, on this machine, what the GPU machine runs (it has no Rust toolchain): the release
# `lipstream` binary and the GPU test binaries, copied into .device/bin (git-ignored, carried).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p lipstream
mkdir -p .device/bin
cp target/release/lipstream .device/bin/
bin=$(cargo test --release -p lipstream-gpu --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "gpu_ops" and m.get("executable"):
        print(m["executable"])')
cp "$bin" .device/bin/gpu_ops
# The PyTorch anchor lives outside this checkout; the device sees only what is carried.
if [ -d ../shared/anchors ]; then
  mkdir -p .device/anchors && cp ../shared/anchors/*.py .device/anchors/
fi
# The device tool carries at most 64 MiB: debug info stays here.
strip .device/bin/lipstream .device/bin/gpu_ops
ls -la .device/bin
