"""Times one diffusers `WanTransformer3DModel` forward (fp32, CPU) for x2v's DiT benchmark.

Writes into --out: the random checkpoint (`save_pretrained` layout), `io.safetensors` (inputs and
the output), and `times.json` (seconds per timed forward, after one warm-up). With --load it
reuses the checkpoint and inputs already in --out and only times.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file, save_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--latent", type=int, nargs=3, default=[2, 32, 32], metavar=("F", "H", "W"))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    if a.load:
        model = WanTransformer3DModel.from_pretrained(a.out / "transformer").eval()
        saved = load_file(str(a.out / "io.safetensors"))
        inputs = {k: saved[k] for k in ("hidden_states", "timestep", "encoder_hidden_states")}
    else:
        model = WanTransformer3DModel(
            num_attention_heads=a.heads, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
            freq_dim=256, ffn_dim=a.ffn, num_layers=a.layers,
        ).eval()
        model.save_pretrained(a.out / "transformer", safe_serialization=True)
        f, h, w = a.latent
        inputs = dict(
            hidden_states=torch.randn(1, 16, f, h, w),
            timestep=torch.tensor([999], dtype=torch.int64),
            encoder_hidden_states=torch.randn(1, 512, 4096),
        )
    times = []
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
        for _ in range(a.runs):
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            times.append(time.perf_counter() - t0)
    if not a.load:
        save_file({**inputs, "output": out}, str(a.out / "io.safetensors"))
    (a.out / "times.json").write_text(json.dumps({"times": times, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
