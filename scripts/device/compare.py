"""Side-by-side table: lipstream's engine benchmark against the PyTorch anchor (same GPU, same call).

  python3 compare.py lipstream_engine.json torch_musetalk.json
"""
import json, os, sys

ours = json.load(open(sys.argv[1]))
torch = json.load(open(sys.argv[2])) if len(sys.argv) > 2 and os.path.exists(sys.argv[2]) else None
print(f"GPU {ours['gpu']} ({ours['sm']}), driver {ours['driver']}, cuDNN {ours['cudnn']}, cuBLASLt {ours['cublaslt']}")
print(f"weights {ours['weight_mib']:.0f} MiB, device memory {ours['device_mib']:.0f} MiB "
      f"(arena + workspace {ours['arena_mib']:.0f} MiB) for stages {','.join(ours['stages'])} at batches {ours['batches']}, "
      f"build {ours['build_s']:.1f} s, {ours['conv_shapes_tuned']} conv shapes tuned")
if len(sys.argv) > 3 and os.path.exists(sys.argv[3]):
    m = json.load(open(sys.argv[3]))
    print(f"avatar engine alone (batches {m['batches']}): {m['device_mib']:.0f} MiB on the device, build {m['build_s']:.1f} s")
rows = [("avatar_frame", "avatar frame"), ("camera_frame", "camera frame"), ("unet", "UNet"),
        ("vae_dec", "VAE decode"), ("vae_enc_2x", "VAE encode x2"), ("whisper_30s", "whisper windows")]
print(f"{'step':<16}{'B':>4}{'lipstream ms':>14}{'per frame':>11}{'torch best ms':>15}{'torch mode':>12}{'ratio':>8}")
for key, r in sorted(ours["results"].items(), key=lambda kv: (kv[0] != "whisper_30s", int(kv[0][1:]) if kv[0][1:].isdigit() else 0)):
    if key == "whisper_30s":
        t = None
        if torch:
            t = torch["results"].get("whisper_30s", {}).get("graph")
        ms = r.get("whisper_30s_ms")
        print(f"{'whisper 30 s':<16}{1:>4}{ms:>14.3f}{ms:>11.3f}{(t or float('nan')):>15.3f}{'graph':>12}{(t / ms if t else float('nan')):>8.2f}")
        continue
    b = int(key[1:])
    for k, label in rows:
        ms = r.get(f"{k}_ms")
        if ms is None:
            continue
        best, mode = None, ""
        if torch and key in torch["results"]:
            for m in ("compile", "graph", "eager"):
                v = torch["results"][key].get(f"{k}_{m}_ms")
                if v is not None and (best is None or v < best):
                    best, mode = v, m
        ratio = best / ms if best else float("nan")
        print(f"{label:<16}{b:>4}{ms:>14.3f}{ms / b:>11.3f}{(best or float('nan')):>15.3f}{mode:>12}{ratio:>8.2f}")
print("ratio = torch time / lipstream time (above 1: lipstream is faster)")
