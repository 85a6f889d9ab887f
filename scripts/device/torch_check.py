"""The CUDA executor against PyTorch at full MuseTalk size, on the same random weights and inputs.

  lipstream models synth --preset musetalk-1.5 --out MODELS
  lipstream engine check --models MODELS --dump DUMP
  python3 torch_check.py MODELS DUMP

Runs diffusers' UNet2DConditionModel and AutoencoderKL and transformers' WhisperEncoder on the
GPU in fp32 (TF32 off: the reference) and in fp16 (what MuseTalk runs), on the inputs
`engine check` wrote, and prints the relative L2 error of lipstream's CUDA (fp16) and CPU (f32)
outputs against the fp32 reference, beside PyTorch fp16's own error. Needs diffusers (carry the
wheel: shared/anchors/fetch-wheels.sh).
"""
import json, sys
import torch
from safetensors.torch import load_file
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
models, dump = sys.argv[1], sys.argv[2]
t = load_file(f"{dump}/check.safetensors")


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def stage(name, model, run, outputs):
    res = {}
    for dtype in (torch.float32, torch.float16):
        m = model.to("cuda", dtype)
        ins = {k.split(".", 2)[2]: v.to("cuda", dtype) for k, v in t.items() if k.startswith(f"{name}.input.")}
        with torch.no_grad():
            res[dtype] = run(m, ins)
    worst = {"lipstream_cuda_fp16": 0.0, "lipstream_cpu_f32": 0.0, "torch_fp16": 0.0}
    for i, out in enumerate(outputs):
        ref = res[torch.float32][i].float()
        for label, got in [("lipstream_cuda_fp16", t[f"{name}.cuda.{out}"]),
                           ("lipstream_cpu_f32", t[f"{name}.cpu.{out}"]),
                           ("torch_fp16", res[torch.float16][i].float())]:
            e = rel(got.reshape(ref.shape), ref)
            worst[label] = max(worst[label], e)
    print(f"{name:<12} vs torch fp32: " + "  ".join(f"{k} {v:.2e}" for k, v in worst.items()), flush=True)
    return worst


report = {}
cfg = json.load(open(f"{models}/musetalkV15/musetalk.json"))
unet = UNet2DConditionModel.from_config(cfg).eval()
unet.load_state_dict(torch.load(f"{models}/musetalkV15/unet.pth", map_location="cpu"))
report["unet"] = stage("unet", unet, lambda m, i: [m(i["sample"], torch.zeros(i["sample"].shape[0], device="cuda"),
                                                     encoder_hidden_states=i["encoder_hidden_states"]).sample],
                       ["sample_out"])
del unet
vae = AutoencoderKL.from_pretrained(f"{models}/sd-vae").eval()
report["vae_enc_2x"] = stage("vae_enc_2x", vae, lambda m, i: [m.encode(i["image"]).latent_dist.mean], ["latent_mean"])
report["vae_dec"] = stage("vae_dec", vae, lambda m, i: [m.decode(i["latent"]).sample], ["image"])
del vae
wcfg = WhisperConfig.from_json_file(f"{models}/whisper/config.json")
enc = WhisperEncoder(wcfg).eval()
w = load_file(f"{models}/whisper/model.safetensors")
enc.load_state_dict({k[len("model.encoder."):]: v for k, v in w.items() if k.startswith("model.encoder.")})
report["whisper_30s"] = stage("whisper_30s", enc,
                              lambda m, i: list(m(i["input_features"], output_hidden_states=True).hidden_states),
                              [f"hidden_state_{j}" for j in range(wcfg.encoder_layers + 1)])


def served_rows(m, i):
    """The full encoder's hidden states cut to each window's rows, as the served encoder's."""
    rows = t["whisper_rows.cuda.hidden_state_0"].shape[1]
    states = m(i["input_features"], output_hidden_states=True).hidden_states
    n = states[0].shape[1]
    first = [min(max(int(round(f)), 0), n - rows) for f in i["first_row"].float().tolist()]
    return [torch.stack([s[b, f:f + rows] for b, f in enumerate(first)]) for s in states]


if "whisper_rows.cuda.hidden_state_0" in t:
    report["whisper_rows"] = stage("whisper_rows", enc, served_rows,
                                   [f"hidden_state_{j}" for j in range(wcfg.encoder_layers + 1)])
json.dump(report, open(f"{dump}/torch_check.json", "w"), indent=1)
