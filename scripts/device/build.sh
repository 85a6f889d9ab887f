#!/usr/bin/env bash
# Builds, on this machine, what the GPU machine runs (it has no Rust toolchain): the release
# `lipstream` binary and the GPU test binaries, copied into .device/bin (git-ignored, carried).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p lipstream
mkdir -p .device/bin
cp target/release/lipstream .device/bin/
# Test binaries the GPU machine runs: (package, test target).
for pair in lipstream-gpu:gpu_ops lipstream:gpu_faces; do
  pkg=${pair%%:*} name=${pair##*:}
  bin=$(cargo test --release -p "$pkg" --test "$name" --no-run --message-format=json 2>/dev/null \
    | NAME=$name python3 -c 'import json,os,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == os.environ["NAME"] and m.get("executable"):
        print(m["executable"])')
  cp "$bin" ".device/bin/$name"
done
# The PyTorch anchor lives outside this checkout; the device sees only what is carried.
if [ -d ../shared/anchors ]; then
  mkdir -p .device/anchors && cp ../shared/anchors/*.py .device/anchors/
fi
# The device tool carries at most 64 MiB, the checkout's tracked files included: debug info
# stays here, and what the device needs travels as one xz archive (~13 MiB instead of ~45):
# carry [".device/pack.tar.xz"]; the device scripts unpack it (scripts/device/unpack.sh).
strip .device/bin/lipstream .device/bin/gpu_ops .device/bin/gpu_faces
ls -la .device/bin
extra=$(cd .device && ls -d anchors base avatar*.safetensors 2>/dev/null | sed 's|^|.device/|' || true)
tar cf - .device/bin $extra | xz -T0 -6 > .device/pack.tar.xz.part
mv .device/pack.tar.xz.part .device/pack.tar.xz
echo "carry .device/pack.tar.xz ($(du -h .device/pack.tar.xz | cut -f1)): bin${extra:+, }$(echo $extra | sed 's|\.device/||g; s| |, |g')"
