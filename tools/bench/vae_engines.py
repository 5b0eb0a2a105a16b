"""VAE decode per backend on the CPU: the libtorch decoder against the exported engines on ONNX
Runtime's CPU provider, for the same latents, on a full-size Qwen-Image VAE (the released config,
random weights). A benchmark that prints tables; it asserts nothing.

    python tools/bench/vae_engines.py [--sizes 256x256,512x512] [--runs 3] [--work DIR]

Steps: writes the random VAE once (`DIR/vae`), exports its decoder with tools/export_vae_onnx.py
(static graphs for --sizes and one dynamic graph spanning them, `DIR/engines`; the export's own
check is skipped, the benchmark compares the two backends' images itself), builds the
`bench_vae` example of x2v-decoder, then runs it twice: once on the catalog of static engines, once
on a catalog holding only the dynamic (profile) engine. Each prints, per size: the engine's first
load, the host memory it added, the median decode of each backend and their ratio, and the largest
difference between the two images.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def write_vae(out: Path):
    import torch
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    AutoencoderKLQwenImage().save_pretrained(str(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256x256,512x512")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work", type=Path, default=target_dir() / "x2v-bench" / "qwen-image-vae")
    args = p.parse_args()

    import export_vae_onnx as ex

    sizes = ex.parse_sizes(args.sizes, "--sizes")
    vae = args.work / "vae"
    if not (vae / "config.json").exists():
        print(f"writing a random full-size Qwen-Image VAE to {vae}", flush=True)
        write_vae(vae)
    engines = args.work / "engines"
    lo = ex.Size(min(s.height for s in sizes), min(s.width for s in sizes))
    hi = ex.Size(max(s.height for s in sizes), max(s.width for s in sizes))
    profile = ex.Profile(lo, hi, [hi])
    print(f"exporting static {args.sizes} and dynamic {lo}..{hi} to {engines}", flush=True)
    ex.export(vae, engines, statics=sizes, profile=profile, verify=False,
              log=lambda m: print(m, flush=True))
    catalog = engines / ex.CATALOG
    text = catalog.read_text()
    dynamic = engines / "dynamic.toml"
    dynamic.write_text('dir = "."\n' + text[text.index("[[profile]]"):])
    static = engines / "static.toml"
    static.write_text(text[:text.index("[[profile]]")])

    build = ["cargo", "build", "-q", "--profile", "test", "-p", "x2v-decoder", "--example", "bench_vae"]
    subprocess.run(build, cwd=ROOT, check=True, env=dict(os.environ, LIBTORCH_USE_PYTORCH="1"))
    binary = target_dir() / "debug" / "examples" / "bench_vae"
    for name, cat in [("static engines", static), ("dynamic (profile) engine", dynamic)]:
        print(f"\n## {name}\n", flush=True)
        subprocess.run([str(binary), "--vae-dir", str(vae), "--engines", str(cat), "--sizes", args.sizes,
                        "--runs", str(args.runs)], check=True)


if __name__ == "__main__":
    main()
