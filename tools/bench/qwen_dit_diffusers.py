"""Times one diffusers `QwenImageTransformer2DModel` forward (fp32, CPU) for x2v's Qwen-Image DiT
benchmark (`x2v-bench-qwen-dit`).

Writes into --out: the random checkpoint (`save_pretrained` layout), `io.safetensors` (inputs, the
token grid and the output), and `times.json` (seconds per timed forward, after one warm-up). With
--load it reuses the checkpoint and inputs already in --out and only times.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from safetensors.torch import load_file, save_file


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--grid", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    p.add_argument("--text", type=int, default=256)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    h, w = a.grid
    if a.load:
        model = QwenImageTransformer2DModel.from_pretrained(a.out / "transformer").eval()
        saved = load_file(str(a.out / "io.safetensors"))
        inputs = {k: saved[k] for k in ("hidden_states", "encoder_hidden_states", "timestep")}
    else:
        model = QwenImageTransformer2DModel(
            num_layers=a.layers, num_attention_heads=a.heads, attention_head_dim=128,
        ).eval()
        model.save_pretrained(a.out / "transformer", safe_serialization=True)
        inputs = dict(
            hidden_states=torch.randn(1, h * w, 64),
            encoder_hidden_states=torch.randn(1, a.text, 3584),
            timestep=torch.tensor([0.999]),
        )
    img_shapes = [[(1, h, w)]]
    times = []
    with torch.no_grad():
        out = model(**inputs, img_shapes=img_shapes, return_dict=False)[0]
        for _ in range(a.runs):
            t0 = time.perf_counter()
            model(**inputs, img_shapes=img_shapes, return_dict=False)
            times.append(time.perf_counter() - t0)
    if not a.load:
        save_file({**inputs, "output": out}, str(a.out / "io.safetensors"))
    (a.out / "times.json").write_text(json.dumps({"times": times, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
