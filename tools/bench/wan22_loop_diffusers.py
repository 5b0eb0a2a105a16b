"""Times diffusers' Wan2.2 A14B denoising loop (fp32, CPU) for x2v's two-expert benchmark
(`x2v-bench-wan22`): `WanPipeline` with `transformer` (high noise) and `transformer_2` (low noise)
switched at `boundary_ratio`, CFG with a guidance scale per expert, from given prompt embeddings to
the final latents (`output_type="latent"`: no text encoder, no VAE).

Writes into --out: the model directory (`model_index.json` with `boundary_ratio`, `transformer/`,
`transformer_2/`, `scheduler/`), `io.safetensors` (the embeddings and the final latents) and
`times.json` (seconds per timed loop, after one warm-up loop). With --load it reuses the directory
and only times.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from safetensors.torch import load_file, save_file


def scheduler(shift):
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ffn", type=int, default=8960)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--load", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model_dir = a.out / "model"
    if a.load:
        experts = [WanTransformer3DModel.from_pretrained(model_dir / d).eval() for d in ("transformer", "transformer_2")]
        embeds = load_file(str(a.out / "io.safetensors"))
    else:
        experts = [
            WanTransformer3DModel(
                num_attention_heads=a.heads, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                freq_dim=256, ffn_dim=a.ffn, num_layers=a.layers,
            ).eval()
            for _ in range(2)
        ]
        embeds = {"prompt_embeds": torch.randn(1, 512, 4096), "negative_prompt_embeds": torch.randn(1, 512, 4096)}
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler(12.0),
                       transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.875)
    if not a.load:
        pipe.save_pretrained(model_dir, safe_serialization=True)

    def loop():
        with torch.no_grad():
            return pipe(prompt_embeds=embeds["prompt_embeds"], negative_prompt_embeds=embeds["negative_prompt_embeds"],
                        height=a.size[0], width=a.size[1], num_frames=a.frames, num_inference_steps=a.steps,
                        guidance_scale=4.0, guidance_scale_2=3.0, generator=torch.Generator("cpu").manual_seed(7),
                        output_type="latent", return_dict=False)[0]

    latents = loop()
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        loop()
        times.append(time.perf_counter() - t0)
    if not a.load:
        save_file({**embeds, "latents": latents.contiguous()}, str(a.out / "io.safetensors"))
    (a.out / "times.json").write_text(json.dumps({"times": times, "torch": torch.__version__}))


if __name__ == "__main__":
    main()
