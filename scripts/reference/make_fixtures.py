"""Golden fixtures for the CPU reference executor, made by the upstream PyTorch implementations.

Writes tests/fixtures/tiny/: tiny-config random weights in the upstream layouts and formats
(the UNet with torch.save, so the .pth reader is exercised; the VAE and whisper as safetensors,
as diffusers/transformers save them), plus golden.safetensors with inputs and outputs of the
UNet, VAE encode (latent mean), VAE decode and the whisper encoder's hidden states.

Also writes tests/fixtures/audio/: a sentence spoken by espeak-ng (Debian package), its Whisper
log-mel and MuseTalk 1.5's per-frame audio prompts through the tiny whisper encoder. And
tests/fixtures/mtcnn/: the real MTCNN weights from the facenet-pytorch wheel,
scikit-image's astronaut.png, the faces facenet-pytorch finds on it, and each net's outputs.

Needs torch (CPU is enough), torchvision, diffusers, transformers, safetensors, facenet-pytorch
(installed with --no-deps: it pins an old torch), scikit-image (PyPI). CI does not run this;
it only reads what it wrote.

    python3 scripts/reference/make_fixtures.py [--out tests/fixtures/tiny]
"""
import argparse
import json
import math
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

# Keep in step with `lipstream models synth --preset tiny` (engines/src/presets.rs).
UNET = dict(
    in_channels=8, out_channels=4, block_out_channels=[16, 32, 32, 32], layers_per_block=2,
    attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, sample_size=32, act_fn="silu",
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32, 32, 32],
    layers_per_block=2, norm_num_groups=8, sample_size=256, scaling_factor=0.18215,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
)
WHISPER = dict(
    d_model=16, encoder_layers=4, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=80,
    max_source_positions=1500, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32,
)


def randomize(module, seed):
    """Every parameter random (upstream zero-inits some), scaled like lipstream's synth."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 2)[-2] if "." in name else ""
            if p.dim() == 1 and not name.endswith(".bias") and ("norm" in leaf or leaf.startswith("ln")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.numel() // p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))


def half_exact(t):
    """Rounds to values f16 holds exactly, so weights/inputs stored as f16 lose nothing."""
    return t.half().float()


def randomize_half(module, seed):
    randomize(module, seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(half_exact(p))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "../../tests/fixtures/tiny"))
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    for d in ["musetalkV15", "sd-vae", "whisper"]:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    torch.manual_seed(0)
    golden = {}
    with torch.no_grad():
        # The UNet is stored as f16 (HalfStorage) to exercise that path; values are f16-exact.
        unet = UNet2DConditionModel(**UNET).eval()
        randomize_half(unet, 1)
        torch.save({k: v.half() for k, v in unet.state_dict().items()}, os.path.join(out, "musetalkV15/unet.pth"))
        with open(os.path.join(out, "musetalkV15/musetalk.json"), "w") as f:
            json.dump(UNET, f, indent=2)
        sample = half_exact(torch.randn(2, 8, 32, 32))
        ctx = half_exact(torch.randn(2, 50, UNET["cross_attention_dim"]))
        golden["unet.sample"] = sample
        golden["unet.encoder_hidden_states"] = ctx
        golden["unet.out"] = unet(sample, 0, encoder_hidden_states=ctx).sample

        # The VAE as diffusers saves it (current attention names), in f16; graphs take any size,
        # so 128x128 keeps the fixture small.
        vae = AutoencoderKL(**VAE).eval()
        randomize_half(vae, 2)
        vae.half().save_pretrained(os.path.join(out, "sd-vae"), safe_serialization=True)
        vae.float()
        image = half_exact(torch.rand(1, 3, 128, 128) * 2 - 1)
        golden["vae.image"] = image
        golden["vae.latent_mean"] = vae.encode(image).latent_dist.mean
        latent = half_exact(torch.randn(1, 4, 16, 16))
        golden["vae.latent"] = latent
        golden["vae.decoded"] = vae.decode(latent).sample

        cfg = WhisperConfig(**WHISPER)
        enc = WhisperEncoder(cfg).eval()
        randomize(enc, 3)
        save_file({f"model.encoder.{k}": v.contiguous() for k, v in enc.state_dict().items()},
                  os.path.join(out, "whisper/model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "whisper/config.json"), "w") as f:
            json.dump(WHISPER, f, indent=2)
        mel = half_exact(torch.randn(1, 80, 3000) * 0.5)
        golden["whisper.input_features"] = mel
        states = enc(mel, output_hidden_states=True).hidden_states
        for i, s in enumerate(states):
            golden[f"whisper.hidden_state_{i}"] = s

    # Inputs are f16-exact and stored as F16; outputs stay F32.
    inputs = {"unet.sample", "unet.encoder_hidden_states", "vae.image", "vae.latent", "whisper.input_features"}
    save_file({k: (v.half() if k in inputs else v.float()).contiguous() for k, v in golden.items()},
              os.path.join(out, "golden.safetensors"))
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out}: {total / 1e6:.1f} MB; torch {torch.__version__}")
    for k, v in golden.items():
        print(f"  {k}: {list(v.shape)}")



def mtcnn_fixtures(out):
    """The real MTCNN weights (from the facenet-pytorch wheel) and what facenet-pytorch finds on
    scikit-image's astronaut.png, plus each net's raw outputs on fixed inputs."""
    import shutil
    import facenet_pytorch
    import skimage
    from PIL import Image
    from facenet_pytorch import MTCNN

    os.makedirs(out, exist_ok=True)
    data = os.path.join(os.path.dirname(facenet_pytorch.__file__), "data")
    for n in ["pnet.pt", "rnet.pt", "onet.pt"]:
        shutil.copy(os.path.join(data, n), os.path.join(out, n))
    astronaut = os.path.join(os.path.dirname(skimage.__file__), "data", "astronaut.png")
    shutil.copy(astronaut, os.path.join(out, "astronaut.png"))

    mtcnn = MTCNN(keep_all=True, device="cpu")
    img = Image.open(astronaut).convert("RGB")
    boxes, probs, points = mtcnn.detect(img, landmarks=True)
    result = {"image": "astronaut.png", "faces": [
        {"box": [float(v) for v in b], "prob": float(p), "landmarks": [[float(x), float(y)] for x, y in pts]}
        for b, p, pts in zip(boxes, probs, points)]}
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(result, f, indent=1)

    g = torch.Generator().manual_seed(4)
    nets = {}
    with torch.no_grad():
        for name, net, size in [("pnet", mtcnn.pnet, (1, 3, 31, 45)), ("rnet", mtcnn.rnet, (3, 3, 24, 24)),
                                ("onet", mtcnn.onet, (2, 3, 48, 48))]:
            x = half_exact(torch.rand(size, generator=g) * 2 - 1)
            nets[f"{name}.input"] = x
            for i, o in enumerate(net(x)):
                nets[f"{name}.output_{i}"] = o
    save_file({k: v.contiguous().float() for k, v in nets.items()}, os.path.join(out, "nets.safetensors"))
    print(f"wrote {out}: {len(result['faces'])} face(s) on astronaut.png: {result['faces']}")




def audio_fixtures(out, tiny):
    """A sentence spoken by espeak-ng, its Whisper log-mel (transformers' WhisperFeatureExtractor)
    and MuseTalk 1.5's per-frame audio prompts from the tiny whisper encoder, sliced the way
    MuseTalk's AudioProcessor.get_whisper_chunk does."""
    import subprocess
    import tempfile
    import wave
    import numpy as np
    from safetensors.torch import load_file
    from transformers import WhisperFeatureExtractor

    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        wav = os.path.join(d, "s.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", wav,
                        "The quick brown fox jumps over the lazy dog."], check=True)
        with wave.open(wav) as w:
            rate, raw = w.getframerate(), w.readframes(w.getnframes())
    pcm = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
    # espeak-ng speaks at 22.05 kHz: resample to 16 kHz by linear interpolation (the fixture is the
    # 16 kHz signal itself; how it was made does not matter to the comparison).
    n16 = int(len(pcm) * 16000 / rate)
    audio = np.interp(np.arange(n16) * rate / 16000, np.arange(len(pcm)), pcm).astype(np.float32)

    fe = WhisperFeatureExtractor()
    mel = fe(audio, sampling_rate=16000, return_tensors="pt").input_features  # [1, 80, 3000]

    cfg = WhisperConfig(**WHISPER)
    enc = WhisperEncoder(cfg).eval()
    weights = load_file(os.path.join(tiny, "whisper/model.safetensors"))
    enc.load_state_dict({k[len("model.encoder."):]: v for k, v in weights.items()})
    with torch.no_grad():
        feats = torch.stack(enc(mel, output_hidden_states=True).hidden_states, dim=2)  # [1, 1500, 5, d]

    # MuseTalk 1.5, AudioProcessor.get_whisper_chunk (fps 25, padding left 2, right 2).
    sr, fps, audio_fps, left, right = 16000, 25, 50, 2, 2
    per_frame = 2 * (left + right + 1)
    num_frames = math.floor(len(audio) / sr * fps)
    actual = math.floor(len(audio) / sr * audio_fps)
    f = feats[:, :actual]
    mult = audio_fps / fps
    pad = math.ceil(mult)
    f = torch.cat([torch.zeros_like(f[:, :pad * left]), f, torch.zeros_like(f[:, :pad * 3 * right])], 1)
    prompts = []
    for i in range(num_frames):
        idx = math.floor(i * mult)
        prompts.append(f[:, idx:idx + per_frame])
    prompts = torch.cat(prompts, dim=0)  # [frames, 10, 5, d]
    prompts = prompts.reshape(prompts.shape[0], -1, prompts.shape[-1])  # b (c h) w

    save_file({
        "audio_16k": torch.from_numpy(audio),
        "mel_first_400": mel[0, :, :400].contiguous(),
        "mel_last": mel[0, :, -1].contiguous(),
        "prompts": prompts.contiguous().float(),
    }, os.path.join(out, "audio.safetensors"))
    print(f"wrote {out}: {len(audio) / 16000:.2f} s of speech, mel {list(mel.shape)}, prompts {list(prompts.shape)}")


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    main()
    mtcnn_fixtures(os.path.join(here, "../../tests/fixtures/mtcnn"))
    audio_fixtures(os.path.join(here, "../../tests/fixtures/audio"), os.path.join(here, "../../tests/fixtures/tiny"))
