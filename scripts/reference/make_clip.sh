#!/usr/bin/env bash
# Makes tests/fixtures/clip/: 1.2 s H.264 clips of the astronaut picture panning (30 fps, High
# profile with B-frames, what phones and ffmpeg write), one of them stored on its side with a
# display matrix, and golden.json, the sha256 of each picture's luma plane as ffmpeg decodes
# (and turns) it, in presentation order. Needs an ffmpeg with libx264
# (e.g. the one in the imageio-ffmpeg wheel); the tests only read the committed files.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=tests/fixtures/clip
mkdir -p "$out"
ffmpeg -hide_banner -loglevel error -y -loop 1 -framerate 30 -i tests/fixtures/mtcnn/astronaut.png \
  -t 1.2 -vf "crop=448:448:x='32+24*sin(2*PI*t)':y='24+8*t',scale=320:320,format=yuv420p" \
  -c:v libx264 -profile:v high -preset medium -crf 26 -bf 3 -g 12 -movflags +faststart \
  "$out/talk.mp4"
# A phone's portrait clip: stored on its side (336x288) with a display matrix that turns it
# upright (a quarter turn counter-clockwise), which players, and ffmpeg's decoding below, apply.
ffmpeg -hide_banner -loglevel error -y -loop 1 -framerate 30 -i tests/fixtures/mtcnn/astronaut.png \
  -t 1.2 -vf "crop=384:448:x='64+24*sin(2*PI*t)':y='16+8*t',scale=288:336,transpose=clock,format=yuv420p" \
  -c:v libx264 -profile:v high -preset medium -crf 26 -bf 3 -g 12 /tmp/lipstream-stored.mp4
ffmpeg -hide_banner -loglevel error -y -display_rotation:v:0 90 -i /tmp/lipstream-stored.mp4 \
  -c copy -movflags +faststart "$out/portrait.mp4"
# HEVC, which lipstream does not read (the tests check the message).
ffmpeg -hide_banner -loglevel error -y -i "$out/talk.mp4" -t 0.12 -vf scale=64:64 -c:v libx265 \
  -x265-params log-level=error -tag:v hvc1 "$out/hevc.mp4"
lumas() { # FILE W H: the sha256 of each decoded picture's luma plane, as a JSON list
  ffmpeg -hide_banner -loglevel error -i "$1" -f rawvideo -pix_fmt yuv420p - | W=$2 H=$3 python3 -c '
import hashlib, json, os, sys
w, h = int(os.environ["W"]), int(os.environ["H"])
data = sys.stdin.buffer.read()
print(json.dumps([hashlib.sha256(data[i:i + w * h]).hexdigest()
                  for i in range(0, len(data), w * h * 3 // 2)]))'
}
cat >"$out/golden.json" <<JSON
{"width": 320, "height": 320, "fps": 30, "luma_sha256": $(lumas "$out/talk.mp4" 320 320),
 "portrait": {"width": 288, "height": 336, "luma_sha256": $(lumas "$out/portrait.mp4" 288 336)}}
JSON
echo "wrote $out/talk.mp4, $out/portrait.mp4, $out/hevc.mp4 and $out/golden.json"
