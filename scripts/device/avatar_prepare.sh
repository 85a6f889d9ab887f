#!/usr/bin/env bash
# Runs on the GPU machine (device tool, carry [".device/pack.tar.xz"]): `avatar prepare --video` on the
# fixture clip (H.264 High, B-frames, 30 fps) with the tiny model, once with the VAE encoder on
# the GPU and once on the CPU reference executor, and compares the two bundles (same frames and
# boxes; latents within fp16's error). Then, when BENCH=1, the engine benchmark without the
# anchor (per-frame times on this GPU). Logs and the verdict under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
source scripts/device/unpack.sh
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp}
bin=./.device/bin/lipstream
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
status=0
for ex in cuda cpu; do
  start=$(date +%s.%N)
  $bin avatar prepare --video tests/fixtures/clip/talk.mp4 --models tests/fixtures/tiny \
    --mtcnn tests/fixtures/mtcnn --executor "$ex" --out "/tmp/clip_$ex.safetensors" \
    > "$out/prepare_$ex.log" 2>&1 || status=1
  echo "prepare --executor $ex: $(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }") s, $(tail -1 "$out/prepare_$ex.log")"
done
python3 - <<'EOF' | tee "$out/prepare_compare.txt" || status=1
import json, struct, sys
import numpy as np

def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    types = {"F32": np.float32, "F16": np.float16, "U8": np.uint8}
    return {k: np.frombuffer(data[v["data_offsets"][0]:v["data_offsets"][1]],
                             types[v["dtype"]]).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}, header.get("__metadata__", {})

(gpu, gmeta), (cpu, cmeta) = read("/tmp/clip_cuda.safetensors"), read("/tmp/clip_cpu.safetensors")
gl, cl = read("/tmp/clip_cuda.latents.safetensors")[0], read("/tmp/clip_cpu.latents.safetensors")[0]
rel = float(np.linalg.norm(gl["latents"] - cl["latents"]) / np.linalg.norm(cl["latents"]))
same_frames = bool((gpu["rgb"] == cpu["rgb"]).all())
same_boxes = bool((gl["boxes"] == cl["boxes"]).all())
print(json.dumps({"executors": [gmeta.get("executor"), cmeta.get("executor")],
                  "frames": list(gpu["rgb"].shape), "same_frames": same_frames,
                  "same_boxes": same_boxes, "latents_rel_l2_cuda_vs_cpu": rel}))
ok = same_frames and same_boxes and rel <= 1e-2 and gmeta.get("executor") == "cuda"
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
EOF
if [ "${BENCH:-0}" = 1 ]; then
  $bin bench engine --stages avatar,camera,whisper --batches 1,16 --runs 20 \
    --out "$out/lipstream_engine.json" > /dev/null 2> "$out/lipstream_engine.log" || status=1
  grep -E "ms/frame|whisper" "$out/lipstream_engine.log" | tail -12
fi
exit "$status"
