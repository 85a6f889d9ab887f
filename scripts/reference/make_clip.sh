#!/usr/bin/env bash
# Makes tests/fixtures/clip/: a 1.2 s H.264 clip of the astronaut picture panning (30 fps, High
# profile with B-frames, what phones and ffmpeg write), and golden.json, the sha256 of each
# picture's luma plane as ffmpeg decodes it, in presentation order. Needs an ffmpeg with libx264
# (e.g. the one in the imageio-ffmpeg wheel); the tests only read the committed files.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=tests/fixtures/clip
mkdir -p "$out"
ffmpeg -hide_banner -loglevel error -y -loop 1 -framerate 30 -i tests/fixtures/mtcnn/astronaut.png \
  -t 1.2 -vf "crop=448:448:x='32+24*sin(2*PI*t)':y='24+8*t',scale=320:320,format=yuv420p" \
  -c:v libx264 -profile:v high -preset medium -crf 26 -bf 3 -g 12 -movflags +faststart \
  "$out/talk.mp4"
ffmpeg -hide_banner -loglevel error -i "$out/talk.mp4" -f rawvideo -pix_fmt yuv420p - |
  python3 -c '
import hashlib, json, sys
w = h = 320
frame = w * h * 3 // 2
data = sys.stdin.buffer.read()
lumas = [hashlib.sha256(data[i:i + w * h]).hexdigest() for i in range(0, len(data), frame)]
json.dump({"width": w, "height": h, "fps": 30, "luma_sha256": lumas}, sys.stdout, indent=1)
' >"$out/golden.json"
echo "wrote $out/talk.mp4 ($(stat -c %s "$out/talk.mp4") bytes) and $out/golden.json"
