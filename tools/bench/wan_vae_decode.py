"""diffusers side of `x2v-bench-vae`: builds a random `AutoencoderKLWan`, saves its weights and a
latent tensor for the Rust side, and times `vae.decode` (median of --runs after one warm-up).

Prints one JSON line: {"median_s": ..., "times_s": [...], "threads": ...}.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base-dim", type=int, default=32)
    ap.add_argument("--latent", type=str, default="3,16,16", help="T,H,W of the latent")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    vae = AutoencoderKLWan(base_dim=args.base_dim).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    vae.save_pretrained(args.out / "vae", safe_serialization=True)
    t, h, w = (int(v) for v in args.latent.split(","))
    z = torch.randn(1, 16, t, h, w)

    times = []
    with torch.no_grad():
        out = vae.decode(z).sample  # warm-up
        for _ in range(args.runs):
            start = time.perf_counter()
            out = vae.decode(z).sample
            times.append(time.perf_counter() - start)
    save_file({"z": z, "decoded": out.contiguous()}, str(args.out / "io.safetensors"))
    print(json.dumps({"median_s": statistics.median(times), "times_s": times, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
