"""Disaggregated stage services against the monolithic `x2v generate`, on the CPU: memory, throughput
and per-stage time, for Wan2.1 text to video (default) or Qwen-Image text to image
(`--family qwen-image`, below). A benchmark that prints tables; it asserts nothing.

What it measures, for the same checkpoint, prompts, seeds and settings on both sides:

  (a) Peak RSS. Each stage service (`x2v encoder`, `x2v dit`, `x2v decoder`) and `x2v gateway` is a
      long-lived process: its VmRSS and VmHWM right after it is ready (weights loaded), its VmHWM (peak
      RSS) from /proc/PID/status read after every job has finished, before it is stopped, and the
      largest VmRSS sampled every 0.2 s during the jobs. Each monolithic `x2v generate` run: its peak
      RSS at exit (`ru_maxrss` from wait4, i.e. VmHWM just before exit; the largest over the runs is
      reported). RSS counts a shared page in every process that maps it, and the stages share memory
      (each pre-faults a `transfer.pool_mib` receive pool of memfd pages that its peers map too), so a
      second table splits RSS into anonymous / file / shmem pages and gives PSS (/proc/PID/smaps_rollup,
      shared pages divided among their users), whose sum over the stages is sampled during the jobs.
  (b) Throughput for N concurrent jobs (default 8), in jobs/min, and the ratio of the two sides.
      Disaggregated: redis-server + gateway + 1 encoder + 1 DiT + 1 decoder (the shipped capacities:
      encoder 2, DiT 1, decoder 2); the N jobs are submitted at once with the official `openai` client
      (`client.videos.create`, then `client.videos.poll`), timed from the first submission to the last
      completion (model loading is not in it: the services are started and ready first). Monolithic:
      the same N jobs as `x2v generate` runs, one at a time and K at a time (`--parallel 1,2`), timed
      from the first start to the last exit; every run loads its own weights, as a one-shot
      `x2v generate` does. Also CPU seconds per job (user + system, of the runs or of the services).
  (c) Per-stage time: the `x2v_stage_seconds{service, phase}` histograms (sum / count = mean seconds
      per job and phase) and `x2v_stage_step_seconds` from each stage's /metrics, and the DiT:encoder
      and decoder:DiT time ratios (configs/README.md, "Sizing the DiT:encoder ratio"), both from each
      stage's device time per job (step seconds summed over the jobs: the encoder and decoder report
      one step at the end of a job) and from the `run` phase (which also counts the wait for the
      device thread when a stage holds 2 jobs). `x2v generate` prints no timings of its own; it draws
      a denoising progress bar when stderr is a terminal, so its stderr is a pseudo-terminal here and
      the bar's step times split each run into "before denoising" (start-up, UMT5 load + encode, DiT
      load), "denoising" and "after denoising" (VAE load + decode, MP4 encoding, write).
      Transfer per phase: `x2v_transfer_seconds{transport}` of the DiT (Phase1) and of the decoder
      (Phase2), from the fetch request to the last tensor verified, with the sender hashing its SHA-256
      leaves while it writes, and the bytes moved.

Transfer at Wan2.1 480p / 81-frame payload sizes: Phase2 is the final latents (16 x 21 x 60 x 104,
8 MiB in fp32) whatever the DiT's or the VAE's width; Phase1 of text to video is the prompt
embeddings of the prompt's own tokens (x2v does not send the padding to 512 tokens), 2 x tokens x
the text encoder's width (4096 for UMT5-XXL). A model with UMT5's real width and a narrow DiT and
VAE moves those bytes while its compute stays small (the VAE decode at 480p still takes minutes on a
CPU; with one job at a time the decoder is idle when its payload arrives):

  ~/.cache/x2v/venv/bin/python tools/bench/stages.py --size 832x480 --frames 81 --steps 1 --jobs 1 \
      --rounds 1 --parallel '' --text-dim 4096 --text-heads 32 --text-ff 256 --text-layers 1 \
      --dit-heads 2 --dit-head-dim 32 --dit-ffn 128 --dit-layers 1 --vae-dim 8

The model is random-initialised (its videos are noise; only shapes and sizes matter here):

  --model mid   (default) a mid-size Wan2.1 T2V model in the diffusers layout, written once with the
                pinned diffusers/transformers of the venv and the tokenizer/scheduler of the project's
                fixture generators (tools/fixtures/umt5.py, wan_pipeline.py): a DiT of width 1536
                (12 heads x 128, the 1.3B model's), FFN 8960 and 2 blocks (114 M parameters, 435 MiB
                fp32); a UMT5 of width 1024, 16 heads, FFN 2816, 6 layers and a 32128-row embedding
                (110 M, 420 MiB); the Wan2.1 VAE's own shape, base width 96 (127 M, 485 MiB). Written
                in ~15 s and cached under --work by its shape; --dit-layers, --text-layers, --vae-dim,
                ... change it.
  --model demo  the tiny model of `x2v demo-model` (a few MiB: only start-up and overheads show).
  --model-dir DIR  any existing Wan2.1 T2V model directory.

Run (after `cargo build --release -p x2v`; the venv of scripts/setup.sh has torch, diffusers,
transformers and openai; redis-server must be on PATH; libtorch is found in the venv's torch):

  export CARGO_TARGET_DIR=~/.cache/x2v/target   # wherever target/release/x2v is (or pass --x2v)
  ~/.cache/x2v/venv/bin/python tools/bench/stages.py [--jobs 8] [--parallel 1,2] [--rounds 2]

Defaults: 128x128, 5 frames, 4 steps, guidance 5 (CFG on), shift 3, fps 8, 8 jobs, 2 rounds. A
round runs monolithic 1 at a time, disaggregated, monolithic 2 at a time; the second round runs
them in reverse order, so that the two sides are interleaved and load from other processes on the
host falls on both. With the mid-size model that is 10 to 15 minutes on two CPU cores (one round
with 9 frames: 6 to 10). The tables list every round, then the throughput summed over the rounds.
Timings on a shared host are noisy: the load average is printed before and after, and CPU seconds
per job are less sensitive to it than wall time. Configs, logs and outputs stay under --work.

Qwen-Image (`--family qwen-image`): the same processes, /proc sampling, Redis and gateway, serving a
text-to-image model through the images API (`client.images.generate`):

  model  a mid-size random Qwen-Image T2I model in the diffusers layout (`QwenImagePipeline.
         save_pretrained`), with the tokenizer and scheduler of tools/fixtures/qwen_pipeline.py and its
         text encoder's configuration (special-token ids, M-RoPE) at mid size: an MMDiT of width 1536
         (12 heads x 128, joint_attention_dim 1024) and 2 layers (179 M parameters, 684 MiB fp32); a
         Qwen2.5-VL text decoder of hidden 1024, 8 query / 2 key-value heads, FFN 5504, 6 layers and a
         32768-row (tied) embedding, with a tiny vision tower that T2I does not run but x2v loads (151 M,
         577 MiB); the VAE at Qwen-Image's shape (`AutoencoderKLQwenImage` defaults, base width 96: 127 M,
         484 MiB). Written in ~25 s, cached under --work by its shape (--dit-layers, --text-layers, ...).
  (a) peak RSS as above: `--jobs` (default 2) one-image requests at once, against `x2v generate --task
      t2i` runs (1 at a time); then the DiT stage's memory with `previews = false` in its config against
      the default `previews = true` (the DiT then also holds the VAE decoder, to decode the previews of
      streamed requests): once ready, after the same one-image requests, after streamed requests.
  (c) n = 4 images per request, end to end, with the DiT stage's `image_batch` = 0 (the 4 images in
      one batch per transformer forward) and 1 (back to back): a fresh DiT for each setting, `--rounds`
      (default 2) rounds in alternating order, `--batch-requests` (default 1) requests per start.
  (d) time to the first partial image: `stream=True, partial_images=K` for K in `--partial-images`
      (default 1,2,3), n = 1: seconds to the first and last `image_generation.partial_image` event and
      to `image_generation.completed`, and the same request without streaming.
  Defaults: 256x256, 4 steps, guidance 4 (true CFG), 2 jobs, x2v generate 1 at a time. 4 to 10
  minutes on two CPU cores, depending on the other load on the host:

  export CARGO_TARGET_DIR=~/.cache/x2v/target
  ~/.cache/x2v/venv/bin/python tools/bench/stages.py --family qwen-image
"""

import argparse
import base64
import concurrent.futures as cf
import errno
import fcntl
import hashlib
import json
import os
import pty
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tools" / "fixtures"
MODEL_NAME = "x2v-bench"
SECRET = "x2v-bench-transfer-secret-0123456789"
PROMPTS = [
    "A cat walks on the grass, realistic style.",
    "A panda eating bamboo in a misty forest, cinematic lighting.",
    "Two astronauts ride horses across the surface of the moon at sunset.",
    "The camera slowly pans over a city skyline at night with neon signs.",
    "A bowl of ramen, steam rising; close-up shot, shallow depth of field.",
    "Waves crash against the rocks while gulls circle overhead.",
    "A dog runs on the beach at sunset, cinematic style.",
    "A black cat sleeps on the sofa near the window.",
]
NEGATIVE = "blurry, low quality"
MIB = 1024 * 1024

CHILDREN: list = []  # every process this script started, stopped at exit


# ---------------------------------------------------------------------------------------------
# Model


def model_spec(a) -> dict:
    return {
        "dit": dict(heads=a.dit_heads, head_dim=a.dit_head_dim, ffn=a.dit_ffn, layers=a.dit_layers, freq_dim=256),
        "text": dict(d_model=a.text_dim, heads=a.text_heads, d_kv=a.text_dim // a.text_heads, d_ff=a.text_ff,
                     layers=a.text_layers, vocab=a.text_vocab),
        "vae": dict(base_dim=a.vae_dim, num_res_blocks=2),
        "seed": 0,
    }


def write_mid_model(out: Path, spec: dict) -> None:
    """Writes a random Wan2.1 T2V model of `spec`'s shape with `WanPipeline.save_pretrained`."""
    sys.path.insert(0, str(FIXTURES))
    import torch
    from common import seed_everything
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel
    from umt5 import build_tokenizer
    from wan_pipeline import scheduler

    seed_everything(spec["seed"])
    torch.use_deterministic_algorithms(False)
    d, t, v = spec["dit"], spec["text"], spec["vae"]
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= t["vocab"], "the embedding must cover the tokenizer"
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=t["vocab"], d_model=t["d_model"], d_kv=t["d_kv"], d_ff=t["d_ff"], num_layers=t["layers"],
        num_heads=t["heads"], relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=d["heads"], attention_head_dim=d["head_dim"], in_channels=16,
        out_channels=16, text_dim=t["d_model"], freq_dim=d["freq_dim"], ffn_dim=d["ffn"], num_layers=d["layers"],
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    ).eval()
    vae = AutoencoderKLWan(base_dim=v["base_dim"], z_dim=16, dim_mult=[1, 2, 4, 4],
                           num_res_blocks=v["num_res_blocks"], attn_scales=[],
                           temperal_downsample=[False, True, True]).eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler(3.0),
                       transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in [("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae)]}
    (out / "bench_model.json").write_text(json.dumps({"spec": spec, "parameters": counts}, indent=2) + "\n")


def qwen_model_spec(a) -> dict:
    return {
        "family": "qwen-image",
        "dit": dict(heads=a.dit_heads, head_dim=a.dit_head_dim, layers=a.dit_layers, axes_dims_rope=[16, 56, 56]),
        "text": dict(hidden=a.text_dim, heads=a.qwen_text_heads, kv_heads=a.qwen_text_kv_heads, ff=a.qwen_text_ff,
                     layers=a.text_layers, vocab=a.qwen_text_vocab, vision_depth=2, vision_dim=64),
        "vae": dict(base_dim=a.vae_dim, num_res_blocks=2),
        "seed": 0,
    }


def write_qwen_model(out: Path, spec: dict) -> None:
    """Writes a random Qwen-Image T2I model of `spec`'s shape with `QwenImagePipeline.save_pretrained`:
    the tokenizer and scheduler of tools/fixtures/qwen_pipeline.py, a Qwen2.5-VL text encoder configured
    as that fixture's (special-token ids, M-RoPE) at `spec`'s size with a tiny vision tower (T2I does not
    run it, but x2v loads it), the published VAE shape and an MMDiT of `spec`'s width and depth."""
    sys.path.insert(0, str(FIXTURES))
    import torch
    from common import seed_everything
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from qwen_pipeline import DIT, SCHEDULER
    from qwen_tokenizer import build_tokenizer, save
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    seed_everything(spec["seed"])
    torch.use_deterministic_algorithms(False)
    d, t, v = spec["dit"], spec["text"], spec["vae"]
    tokenizer = build_tokenizer()
    assert len(tokenizer) <= t["vocab"], "the embedding must cover the tokenizer"
    ids = tokenizer.convert_tokens_to_ids
    head_dim = t["hidden"] // t["heads"]
    unit = head_dim // 16  # Qwen2.5-VL's M-RoPE split of head_dim / 2: [16, 24, 24] at head_dim 128
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["ff"],
            num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0,
                                 mrope_section=[2 * unit, 3 * unit, 3 * unit]),
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=t["vision_depth"], hidden_size=t["vision_dim"], num_heads=2, intermediate_size=2 * t["vision_dim"],
            out_hidden_size=t["hidden"], patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
            window_size=112, fullatt_block_indexes=[t["vision_depth"] - 1],
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,  # as the smaller Qwen2.5-VL releases; x2v skips lm_head either way
    )
    config._attn_implementation = "sdpa"
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(**dict(
        DIT, num_layers=d["layers"], attention_head_dim=d["head_dim"], num_attention_heads=d["heads"],
        joint_attention_dim=t["hidden"], axes_dims_rope=tuple(d["axes_dims_rope"]))).eval()
    vae = AutoencoderKLQwenImage(base_dim=v["base_dim"], num_res_blocks=v["num_res_blocks"]).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(out, safe_serialization=True)
    save(out)  # tokenizer/ with the slow-tokenizer files, as the fixture writes it
    shutil.rmtree(out / "processor")  # the text-to-image layout has none
    counts = {name: sum(p.numel() for p in m.parameters())
              for name, m in [("text_encoder", text_encoder), ("transformer", transformer), ("vae", vae)]}
    counts["text_encoder (vision tower)"] = sum(p.numel() for p in text_encoder.model.visual.parameters())
    (out / "bench_model.json").write_text(json.dumps({"spec": spec, "parameters": counts}, indent=2) + "\n")


def prepare_model(a, binary: Path, env: dict) -> Path:
    if a.model_dir:
        return Path(a.model_dir).resolve()
    if a.model == "demo":
        if a.family != "wan":
            sys.exit("--model demo is a Wan2.1 model; use --model mid or --model-dir with --family qwen-image")
        out = a.work / "model-demo"
        if not (out / "model_index.json").exists():
            subprocess.run([str(binary), "demo-model", "--out", str(out)], env=env, check=True,
                           stdout=subprocess.DEVNULL)
        return out
    spec = qwen_model_spec(a) if a.family == "qwen-image" else model_spec(a)
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    out = a.work / (f"model-qwen-mid-{key}" if a.family == "qwen-image" else f"model-mid-{key}")
    if (out / "bench_model.json").exists() and (out / "model_index.json").exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    log(f"writing the mid-size random model to {out} ...")
    t = time.monotonic()
    # In a child process, so that torch's memory is not held by this one while it measures.
    subprocess.run([sys.executable, __file__, "--write-model", str(out), "--spec", json.dumps(spec)], check=True)
    log(f"  written in {time.monotonic() - t:.0f} s")
    return out


def component_sizes(model_dir: Path) -> list:
    rows = []
    for comp in ["tokenizer", "text_encoder", "transformer", "vae"]:
        files = [f for f in (model_dir / comp).glob("*.safetensors")]
        size = sum(f.stat().st_size for f in files)
        rows.append((comp, size))
    params = {}
    meta = model_dir / "bench_model.json"
    if meta.exists():
        params = json.loads(meta.read_text()).get("parameters", {})
    return [(c, s, params.get(c)) for c, s in rows]


# ---------------------------------------------------------------------------------------------
# Processes and /proc


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_kib(pid: int, key: str):
    """`VmRSS`, `VmHWM`, ... of /proc/PID/status in KiB (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_parts(pid: int) -> dict:
    """VmRSS split into anonymous, file-backed and shared-memory pages (KiB)."""
    return {k: proc_kib(pid, k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem")}


def pss_parts(pid: int) -> dict:
    """Proportional set size (shared pages divided among the processes that map them), KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                    out[k] = int(rest.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def x2v_env(a) -> dict:
    env = dict(os.environ)
    torch_lib = sorted(Path(sys.prefix).glob("lib/python3*/site-packages/torch/lib"))
    if torch_lib:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(torch_lib[0])] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env.pop("X2V_CONFIG", None)
    env.pop("RUST_LOG", None)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    return env


def stop(proc, timeout=30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all() -> None:
    for p in reversed(CHILDREN):
        try:
            stop(p, timeout=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class RssSampler(threading.Thread):
    """Largest VmRSS and PSS seen per process, and the largest PSS sum over `groups` of processes,
    sampled every `period` seconds (VmRSS cross-checks VmHWM; PSS counts shared pages once)."""

    def __init__(self, pids: dict, groups: dict, period=0.2):
        super().__init__(daemon=True)
        self.pids, self.groups, self.period = pids, groups, period
        self.rss = {k: 0 for k in pids}
        self.pss = {k: 0 for k in list(pids) + list(groups)}
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            now = {}
            for name, pid in self.pids.items():
                self.rss[name] = max(self.rss[name], proc_kib(pid, "VmRSS") or 0)
                now[name] = pss_parts(pid).get("Pss", 0)
                self.pss[name] = max(self.pss[name], now[name])
            for g, members in self.groups.items():
                self.pss[g] = max(self.pss[g], sum(now[m] for m in members))
            self.done.wait(self.period)

    def finish(self) -> "RssSampler":
        self.done.set()
        self.join()
        return self


# ---------------------------------------------------------------------------------------------
# Monolithic: x2v generate

BAR = re.compile(r"denoise\s.*?(\d+)/(\d+) steps")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def generate_argv(a, binary, model_dir, i, out_dir) -> list:
    """`x2v generate` of job `i`: a video (Wan) or an image (Qwen-Image) of the same settings as the
    served job."""
    cmd = [str(binary), "generate", "--model-dir", str(model_dir), "--prompt", PROMPTS[i % len(PROMPTS)],
           "--negative-prompt", NEGATIVE, "--size", a.size, "--steps", str(a.steps), "--guidance", str(a.guidance),
           "--seed", str(i)]
    if a.family == "qwen-image":
        return cmd + ["--task", "t2i", "--n", "1", "--out", str(out_dir / f"job{i}.png")]
    return cmd + ["--task", "t2v", "--frames", str(a.frames), "--shift", str(a.shift), "--fps", str(a.fps),
                  "--out", str(out_dir / f"job{i}.mp4")]


def run_generate(a, binary, model_dir, env, i, out_dir) -> dict:
    """One `x2v generate` run with stderr on a pseudo-terminal; wall time, phase split, peak RSS."""
    cmd = generate_argv(a, binary, model_dir, i, out_dir)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    CHILDREN.append(proc)
    os.close(slave)
    steps_seen: dict = {}
    text = []

    def read():
        buf = ""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno == errno.EIO:
                    break
                raise
            if not chunk:
                break
            now = time.monotonic() - t0
            s = ANSI.sub("", chunk.decode(errors="replace"))
            text.append(s)
            buf = (buf + s)[-400:]
            for m in BAR.finditer(buf):
                steps_seen.setdefault(int(m.group(1)), now)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    os.close(master)
    if proc.returncode != 0:
        raise RuntimeError(f"x2v generate job {i} failed ({proc.returncode}):\n{''.join(text)[-3000:]}")
    r = {"wall": wall, "maxrss_kib": usage.ru_maxrss, "cpu": usage.ru_utime + usage.ru_stime,
         "pre": None, "denoise": None, "post": None}
    n = a.steps
    if n >= 2 and 1 in steps_seen and n in steps_seen:
        step = (steps_seen[n] - steps_seen[1]) / (n - 1)
        start = steps_seen[1] - step
        r.update(pre=start, denoise=steps_seen[n] - start, post=wall - steps_seen[n])
    return r


def monolithic(a, binary, model_dir, env, parallel: int, tag: str) -> dict:
    out_dir = a.work / "mono-out" / tag
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"monolithic: {a.jobs} x2v generate runs, {parallel} at a time ...")
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(parallel) as pool:
        runs = list(pool.map(lambda i: run_generate(a, binary, model_dir, env, i, out_dir), range(a.jobs)))
    makespan = time.monotonic() - t0
    log(f"  done in {makespan:.1f} s")
    return {"mode": f"monolithic, {parallel} at a time", "parallel": parallel, "makespan": makespan, "runs": runs}


# ---------------------------------------------------------------------------------------------
# Disaggregated: redis + gateway + encoder + dit + decoder


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_toml(path: Path, top: dict, sections: dict, models: list = ()) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for name, body in sections.items():
        lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in body.items()]
    for m in models:
        lines += ["", "[[models]]"] + [f"{k} = {toml_value(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")


class Service:
    def __init__(self, name, cmd, env, log_path: Path, ready_prefix: str):
        self.name = name
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        CHILDREN.append(self.proc)
        self.pid = self.proc.pid
        self.ready_prefix = ready_prefix
        self.t0 = time.monotonic()
        self.line = None
        self.ready_s = None

    def wait_ready(self, timeout=600.0) -> str:
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if line.startswith(self.ready_prefix):
                self.line = line.strip()
                self.ready_s = time.monotonic() - self.t0
                break
            if time.monotonic() > deadline:
                break
        if self.line is None:
            stop(self.proc)
            raise RuntimeError(f"{self.name} did not become ready; see {self.log.name}")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self.line

    def http(self) -> str:
        m = re.search(r"http=(\S+)", self.line) or re.search(r"listening on (\S+)", self.line)
        return m.group(1)


def scrape(addr: str) -> dict:
    """Prometheus text → {(name, frozenset(labels)): value}."""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([A-Za-z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)", line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


class Cluster:
    """redis-server and the x2v services of one disaggregated run, configs and logs under `base`.
    `procs` maps every running process (redis-server, encoder, dit, decoder, gateway) to its pid."""

    def __init__(self, a, binary, env, base: Path, prefix: str):
        self.a, self.binary, self.env, self.base = a, binary, env, base
        shutil.rmtree(base, ignore_errors=True)
        (base / "outputs").mkdir(parents=True)
        (base / "redis").mkdir()
        self.services: dict = {}  # name -> Service
        self.procs: dict = {}
        self.starts: dict = {}  # stage -> how many times started
        port = free_port()
        self.redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(base / "redis")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        CHILDREN.append(self.redis)
        self.procs["redis-server"] = self.redis.pid
        for _ in range(200):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                time.sleep(0.05)
        else:
            self.close()
            raise RuntimeError("redis-server did not start")
        self.queue = {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0", "prefix": prefix}
        self.storage = {"kind": "local", "path": str(base / "outputs")}
        self.telemetry = {"log_format": "text", "log_level": "warn"}
        self.client = None

    def start_stage(self, stage: str, model_dir: Path, tasks: list, capacity: int, **fields) -> "Service":
        """Starts `x2v <stage>` (rank 0 of MODEL_NAME; `fields` are further top-level config fields);
        `wait_ready` waits for it. A restarted stage gets a config and log of its own."""
        self.starts[stage] = self.starts.get(stage, 0) + 1
        label = stage if self.starts[stage] == 1 else f"{stage}-{self.starts[stage]}"
        cfg = self.base / f"{label}.toml"
        write_toml(cfg, {"rank": 0, "model": MODEL_NAME, "model_dir": str(model_dir), "tasks": tasks,
                         "device": "cpu", "dtype": "auto", "capacity": capacity, **fields},
                   {"queue": self.queue, "transfer": {"secret": SECRET, "pool_mib": self.a.pool_mib},
                    "storage": self.storage, "telemetry": self.telemetry})
        s = Service(stage, [str(self.binary), stage, "--config", str(cfg), "--print-addr"], self.env,
                    self.base / f"{label}.log", f"{stage} ready ")
        self.services[stage] = s
        return s

    def wait_ready(self, *names: str) -> None:
        for name in names:
            s = self.services[name]
            s.wait_ready()
            self.procs[name] = s.pid

    def stop_service(self, name: str) -> None:
        s = self.services.pop(name)
        self.procs.pop(name, None)
        stop(s.proc)
        s.log.close()

    def start_gateway(self, models: list, **http):
        """The gateway serving `models` ([[models]] entries); returns an openai client of it."""
        import warnings

        import openai

        warnings.filterwarnings("ignore", category=DeprecationWarning, module=__name__)  # "Sora API" notices
        gw_cfg = self.base / "gateway.toml"
        write_toml(gw_cfg, {"listen": "127.0.0.1:0"},
                   {"queue": dict(self.queue, maintain_interval_ms=500), "storage": self.storage,
                    "http": {"poll_after_ms": 250, **http}, "telemetry": self.telemetry}, models)
        gateway = Service("gateway", [str(self.binary), "gateway", "--config", str(gw_cfg), "--print-addr"],
                          self.env, self.base / "gateway.log", "listening on ")
        self.services["gateway"] = gateway
        gateway.wait_ready(timeout=60)
        self.procs["gateway"] = gateway.pid
        self.api = f"http://{gateway.http()}/v1"
        self.client = openai.OpenAI(base_url=self.api, api_key="sk-x2v-bench", max_retries=2,
                                    timeout=self.a.request_timeout)
        return self.client

    def wait_registered(self, timeout=60.0) -> None:
        """Until every stage has a live rank in the gateway's Redis."""
        deadline = time.monotonic() + timeout
        while True:
            ranks = {m.id: (m.model_extra or {}).get("x2v", {}).get("ranks", {}) for m in self.client.models.list().data}
            r = ranks.get(MODEL_NAME, {})
            if all(r.get(s) for s in ("encoder", "dit", "decoder")):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the stages did not register: {ranks}")
            time.sleep(0.2)

    def ready_snapshot(self) -> dict:
        """VmRSS split and VmHWM of every process, e.g. once all are ready."""
        return {name: dict(rss_parts(pid), hwm=proc_kib(pid, "VmHWM")) for name, pid in self.procs.items()}

    def stage_metrics(self, stage: str, total: int, timeout=15.0) -> dict:
        """`stage`'s /metrics once it has recorded `total` jobs' `total` phase (that observation
        lands just after the job is marked complete)."""
        deadline = time.monotonic() + timeout
        while True:
            m = scrape(self.services[stage].http())
            if metric(m, "x2v_stage_seconds_count", phase="total") >= total or time.monotonic() > deadline:
                return m
            time.sleep(0.1)

    def close(self) -> None:
        for name in reversed(list(self.services)):
            self.stop_service(name)
        stop(self.redis)


class Measure:
    """Peak memory and CPU of a cluster's processes over some jobs: VmRSS/PSS sampled every 0.2 s from
    `start()`, then `finish()` reads VmHWM, the RSS/PSS split and the CPU seconds used since `start()`."""

    def __init__(self, procs: dict):
        self.procs = dict(procs)
        stages = [n for n in ("encoder", "dit", "decoder") if n in procs]
        self.sampler = RssSampler(self.procs, {"3 stages": stages, "3 stages + gateway": stages + ["gateway"]})

    def start(self) -> "Measure":
        self.sampler.start()
        self.cpu0 = {name: cpu_seconds(pid) for name, pid in self.procs.items()}
        self.t0 = time.monotonic()
        return self

    def stop_clock(self) -> None:
        self.makespan = time.monotonic() - self.t0
        self.cpu = {name: cpu_seconds(pid) - self.cpu0[name] for name, pid in self.procs.items()}

    def finish(self) -> dict:
        peak = {name: proc_kib(pid, "VmHWM") for name, pid in self.procs.items()}
        after = {name: dict(rss_parts(pid), **pss_parts(pid)) for name, pid in self.procs.items()}
        return {"peak": peak, "after": after, "sampled": self.sampler.finish(), "cpu": self.cpu,
                "makespan": self.makespan}


def disaggregated(a, binary, model_dir, env, tag: str) -> dict:
    cluster = Cluster(a, binary, env, a.work / "disagg" / tag, f"bench-{tag}")
    try:
        # The shipped topology's capacities: encoder 2, DiT 1, decoder 2 (configs/wan2.1-t2v-1.3b/).
        for stage, capacity in [("encoder", 2), ("dit", 1), ("decoder", 2)]:
            cluster.start_stage(stage, model_dir, ["t2v"], capacity)
        log("disaggregated: starting the encoder, DiT and decoder services ...")
        cluster.wait_ready("encoder", "dit", "decoder")
        client = cluster.start_gateway(
            [{"name": MODEL_NAME, "tasks": ["t2v"], "sizes": [a.size], "fps": a.fps,
              "max_frames": max(a.frames, 33), "default_seconds": 1, "default_steps": a.steps,
              "max_steps": max(a.steps, 50), "default_guidance_scale": a.guidance,
              "default_shift": a.shift, "max_n": 1}])
        cluster.wait_registered()
        ready = cluster.ready_snapshot()
        load_s = {name: s.ready_s for name, s in cluster.services.items()}

        log(f"disaggregated: {a.jobs} jobs submitted at once through {cluster.api} ...")
        measure = Measure(cluster.procs)

        def job(i):
            t = time.monotonic()
            v = client.videos.create(
                model=MODEL_NAME, prompt=PROMPTS[i % len(PROMPTS)], size=a.size,
                extra_body={"num_frames": a.frames, "num_inference_steps": a.steps, "guidance_scale": a.guidance,
                            "shift": a.shift, "seed": i, "negative_prompt": NEGATIVE},
            )
            v = client.videos.poll(v.id)
            if v.status != "completed":
                raise RuntimeError(f"job {i} {v.id}: {v.status} {v.error}")
            return {"id": v.id, "latency": time.monotonic() - t}

        measure.start()
        with cf.ThreadPoolExecutor(a.jobs) as pool:
            jobs = list(pool.map(job, range(a.jobs)))
        measure.stop_clock()
        log(f"  done in {measure.makespan:.1f} s")
        mp4 = client.videos.download_content(jobs[0]["id"]).content
        if mp4[4:8] != b"ftyp":
            raise RuntimeError("the first job's content is not an MP4")
        stage_metrics = {s: cluster.stage_metrics(s, a.jobs) for s in ("encoder", "dit", "decoder")}
        return dict(measure.finish(), mode="disaggregated (gateway + 1+1+1 stages)", parallel=a.jobs, jobs=jobs,
                    ready=ready, metrics=stage_metrics, load_s=load_s)
    finally:
        cluster.close()


# ---------------------------------------------------------------------------------------------
# Disaggregated Qwen-Image: the same cluster serving text to image through the images API


def image_body(a, seed: int) -> dict:
    return {"negative_prompt": NEGATIVE, "seed": seed, "num_inference_steps": a.steps, "guidance_scale": a.guidance}


def image_request(client, a, i: int, n: int = 1) -> float:
    """`client.images.generate` of job `i` with `n` images; seconds to the answer."""
    t = time.monotonic()
    r = client.images.generate(model=MODEL_NAME, prompt=PROMPTS[i % len(PROMPTS)], size=a.size, n=n,
                               extra_body=image_body(a, i))
    took = time.monotonic() - t
    if len(r.data) != n or not base64.b64decode(r.data[0].b64_json).startswith(b"\x89PNG"):
        raise RuntimeError(f"image job {i}: {len(r.data)} images, not {n} PNGs")
    return took


def streamed_request(client, a, i: int, partial_images: int) -> dict:
    """A streamed request (n = 1): seconds from the request to the first and the last
    `image_generation.partial_image` event and to `image_generation.completed`."""
    t0 = time.monotonic()
    stream = client.images.generate(model=MODEL_NAME, prompt=PROMPTS[i % len(PROMPTS)], size=a.size, n=1,
                                    stream=True, partial_images=partial_images, extra_body=image_body(a, i))
    first = last = done = None
    partials = 0
    for e in stream:
        now = time.monotonic() - t0
        if e.type == "image_generation.partial_image":
            partials += 1
            first = now if first is None else first
            last = now
        elif e.type == "image_generation.completed":
            done = now
    if done is None:
        raise RuntimeError(f"streamed job {i} (partial_images={partial_images}) did not complete")
    return {"partials": partials, "first": first, "last": last, "completed": done}


def image_jobs(cluster, a) -> dict:
    """`a.jobs` requests of one image each, submitted at once, measured as the video jobs are."""
    client = cluster.client
    measure = Measure(cluster.procs)

    def job(i):
        return {"latency": image_request(client, a, i)}

    measure.start()
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        jobs = list(pool.map(job, range(a.jobs)))
    measure.stop_clock()
    log(f"  done in {measure.makespan:.1f} s")
    metrics = {s: cluster.stage_metrics(s, a.jobs) for s in ("encoder", "dit", "decoder")}
    return dict(measure.finish(), jobs=jobs, metrics=metrics)


def restart_dit(cluster, model_dir, **fields) -> None:
    cluster.stop_service("dit")
    cluster.start_stage("dit", model_dir, ["t2i"], 1, **fields)
    cluster.wait_ready("dit")
    cluster.wait_registered()


def qwen_disaggregated(a, binary, model_dir, env) -> dict:
    """Qwen-Image served by gateway + encoder + DiT + decoder: (a) peak RSS over `a.jobs` one-image
    requests, the DiT with previews on and off; (c) n = 4 with `image_batch` 0 and 1; (d) the time to
    the first partial image of streamed requests."""
    cluster = Cluster(a, binary, env, a.work / "disagg" / "qwen-image", "bench-qwen")
    out = {}
    try:
        # The capacities of configs/qwen-image/: encoder 2, DiT 1, decoder 2; the DiT's defaults
        # (image_batch 0, previews on) spelled out.
        cluster.start_stage("encoder", model_dir, ["t2i"], 2)
        cluster.start_stage("dit", model_dir, ["t2i"], 1, image_batch=0, previews=True)
        cluster.start_stage("decoder", model_dir, ["t2i"], 2)
        log("disaggregated: starting the encoder, DiT and decoder services ...")
        cluster.wait_ready("encoder", "dit", "decoder")
        cluster.start_gateway(
            [{"name": MODEL_NAME, "tasks": ["t2i"], "sizes": [a.size], "fps": 0, "max_frames": 1,
              "default_seconds": 0, "default_steps": a.steps, "max_steps": max(a.steps, 50),
              "default_guidance_scale": a.guidance, "default_shift": 3.0, "max_n": 4, "max_input_images": 0}],
            image_timeout_s=int(a.request_timeout))
        cluster.wait_registered()
        ready = cluster.ready_snapshot()
        load_s = {name: s.ready_s for name, s in cluster.services.items()}

        # (a) memory, previews on (the default)
        log(f"disaggregated: {a.jobs} one-image requests at once through {cluster.api} ...")
        r = image_jobs(cluster, a)
        out["memory"] = dict(r, mode="disaggregated (gateway + 1+1+1 stages)", parallel=a.jobs, ready=ready,
                             load_s=load_s)
        previews = [{"previews": True, "ready": ready["dit"], "jobs": r["peak"]["dit"]}]

        # (d) time to the first partial image, on the same DiT
        plan = [0] + a.partial_images
        stream = []
        for rnd in range(1, a.stream_rounds + 1):
            for k in (plan if rnd % 2 else plan[::-1]):
                log(f"streaming: partial_images={k}" if k else "not streaming (reference)")
                if k:
                    stream.append(dict(streamed_request(cluster.client, a, 100 + rnd, k), k=k, round=rnd))
                else:
                    stream.append({"k": 0, "round": rnd, "completed": image_request(cluster.client, a, 100 + rnd)})
        out["stream"] = stream
        previews[0]["streamed"] = proc_kib(cluster.procs["dit"], "VmHWM")

        # (a) the DiT without previews: the same one-image requests, then a streamed one (final image only)
        log("DiT with previews = false ...")
        restart_dit(cluster, model_dir, image_batch=0, previews=False)
        ready_off = cluster.ready_snapshot()["dit"]
        r_off = image_jobs(cluster, a)
        k = max(a.partial_images, default=1)
        off = streamed_request(cluster.client, a, 101, k)
        previews.append({"previews": False, "ready": ready_off, "jobs": r_off["peak"]["dit"],
                         "streamed": proc_kib(cluster.procs["dit"], "VmHWM"), "partials": off["partials"], "k": k})
        out["previews"] = previews

        # (c) n = 4: all images in one batch per forward, or back to back; a fresh DiT for each
        batch = []
        for rnd in range(1, a.rounds + 1):
            for image_batch in ([0, 1] if rnd % 2 else [1, 0]):
                log(f"n = 4, image_batch = {image_batch} (round {rnd}) ...")
                restart_dit(cluster, model_dir, image_batch=image_batch, previews=True)
                secs = [image_request(cluster.client, a, 200 + j, n=4) for j in range(a.batch_requests)]
                m = cluster.stage_metrics("dit", a.batch_requests)
                run_s = metric(m, "x2v_stage_seconds_sum", phase="run") / max(1.0, metric(m, "x2v_stage_seconds_count", phase="run"))
                batch.append({"image_batch": image_batch, "round": rnd, "seconds": secs, "dit_run": run_s,
                              "step": metric(m, "x2v_stage_step_seconds_sum") / max(1.0, metric(m, "x2v_stage_step_seconds_count")),
                              "peak": proc_kib(cluster.procs["dit"], "VmHWM")})
                log(f"  {', '.join(f'{x:.1f}' for x in secs)} s")
        out["batch"] = batch
        return out
    finally:
        cluster.close()


# ---------------------------------------------------------------------------------------------
# Tables


def table(title: str, headers: list, rows: list) -> None:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    print(f"\n{title}")
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def mib(kib) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def mean(xs) -> float:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def model_table(model_dir: Path) -> None:
    rows = [(c, f"{s / MIB:.0f}", f"{p / 1e6:.1f}" if p else "-") for c, s, p in component_sizes(model_dir)]
    meta = model_dir / "bench_model.json"
    extra = json.loads(meta.read_text()).get("parameters", {}) if meta.exists() else {}
    rows += [(c, "", f"{p / 1e6:.1f}") for c, p in extra.items() if " " in c]  # parts of a component
    table("Model (random weights, fp32 safetensors)", ["component", "file MiB", "parameters (M)"], rows)


def memory_tables(results) -> None:
    """(a): the services' RSS once ready, their peaks over the jobs, and x2v generate's peaks."""
    rows, shared = [], []
    for tag, r in results:
        if r["mode"].startswith("disaggregated"):
            smp = r["sampled"]
            for name in ["encoder", "dit", "decoder", "gateway", "redis-server"]:
                rd, af = r["ready"][name], r["after"][name]
                rows.append((f"{name} [{tag}]", mib(rd["VmRSS"]), mib(rd["hwm"]), mib(r["peak"][name]),
                             mib(smp.rss[name])))
                shared.append((f"{name} [{tag}]",
                               f"{mib(af['VmRSS'])} = {mib(af['RssAnon'])} + {mib(af['RssFile'])} + {mib(af['RssShmem'])}",
                               f"{mib(af.get('Pss'))} = {mib(af.get('Pss_Anon'))} + {mib(af.get('Pss_File'))} + "
                               f"{mib(af.get('Pss_Shmem'))}", mib(smp.pss[name])))
            stages = sum(r["peak"][n] for n in ["encoder", "dit", "decoder"])
            rows.append((f"sum of the 3 stages [{tag}]", "", "", mib(stages), ""))
            rows.append((f"sum of the 3 stages + gateway [{tag}]", "", "", mib(stages + r["peak"]["gateway"]), ""))
            for g in ["3 stages", "3 stages + gateway"]:
                shared.append((f"{g}, PSS summed at each sample [{tag}]", "", "", mib(smp.pss[g])))
        else:
            peaks = [x["maxrss_kib"] for x in r["runs"]]
            rows.append((f"x2v generate [{tag}, {r['parallel']} at a time, {len(peaks)} runs]", "", "",
                         f"{mib(max(peaks))} (smallest {mib(min(peaks))})", ""))
    table("(a) Peak RSS, MiB. Services: VmRSS and VmHWM once ready (weights loaded), VmHWM read after the "
          "jobs, and the largest VmRSS sampled every 0.2 s during the jobs. x2v generate: peak RSS at exit "
          "(ru_maxrss = VmHWM), largest of the runs",
          ["process", "RSS ready", "HWM ready", "peak RSS (VmHWM)", "sampled max RSS"], rows)
    table("(a) Shared memory, MiB: RSS counts a shared page in every process that maps it (the stages' "
          "pre-faulted transfer pools, mapped by their peers too; libtorch's code pages); PSS divides it among "
          "them, so PSS adds up. After the jobs, and the largest PSS sampled during them",
          ["process", "RSS after = anon + file + shmem", "PSS after = anon + file + shmem", "sampled max PSS"],
          shared)


def stage_seconds(rows: list, tag: str, r: dict) -> dict:
    """Appends the x2v_stage_seconds rows of a disaggregated result; returns the mean per (stage, phase)."""
    means = {}
    for stage in ["encoder", "dit", "decoder"]:
        m = r["metrics"][stage]
        for phase in ["receive", "run", "finish", "send", "total"]:
            n = metric(m, "x2v_stage_seconds_count", phase=phase)
            s = metric(m, "x2v_stage_seconds_sum", phase=phase)
            means[(stage, phase)] = s / n if n else float("nan")
            rows.append((f"{stage} [{tag}]", phase, int(n), f"{s:.2f}", f"{s / n:.3f}" if n else "-"))
        n = metric(m, "x2v_stage_step_seconds_count")
        s = metric(m, "x2v_stage_step_seconds_sum")
        if n:
            rows.append((f"{stage} [{tag}]", "one step (x2v_stage_step_seconds)", int(n), f"{s:.2f}", f"{s / n:.3f}"))
        rows.append((f"{stage} [{tag}]", "load (start to ready)", 1, f"{r['load_s'][stage]:.2f}", ""))
    return means


def transfer_rows(rows: list, tag: str, r: dict) -> None:
    """Appends one row per payload of a disaggregated result: Phase1 as the DiT fetched it, Phase2 as the
    decoder did (x2v_transfer_seconds{transport}: request to last tensor verified, the sender's hashing
    included; bytes from x2v_transfer_bytes_total{direction="in"})."""
    for phase, stage in [("Phase1 encoder -> DiT", "dit"), ("Phase2 DiT -> decoder", "decoder")]:
        m = r["metrics"][stage]
        transports = sorted({dict(ls)["transport"] for (n, ls) in m
                             if n == "x2v_transfer_seconds_count" and "transport" in dict(ls)})
        n = metric(m, "x2v_transfer_seconds_count")
        s = metric(m, "x2v_transfer_seconds_sum")
        b = metric(m, "x2v_transfer_bytes_total", direction="in")
        if not n:
            rows.append((f"{phase} [{tag}]", "-", 0, "-", "-", "-"))
            continue
        rows.append((f"{phase} [{tag}]", ",".join(transports), int(n), f"{b / n / MIB:.2f}",
                     f"{s / n * 1e3:.2f}", f"{b / s / 1e9:.2f}" if s else "-"))


TRANSFER_TITLE = ("(c) Transfer per phase, mean per job: fetching the previous stage's payload, from the request to "
                  "its last tensor verified (SHA-256 on, the sender hashing while it writes), from "
                  "x2v_transfer_seconds and x2v_transfer_bytes_total")
TRANSFER_HEADERS = ["payload", "transport", "jobs", "MiB", "ms", "GB/s"]


STAGE_SECONDS_TITLE = "(c) Stage services: x2v_stage_seconds{service, phase} from /metrics (mean = sum / count)"


def generate_phases(results, before: str, after: str) -> None:
    rows = []
    for tag, r in results:
        if r["mode"].startswith("disaggregated"):
            continue
        runs = r["runs"]
        rows.append((f"{r['mode']} [{tag}]", len(runs), f"{mean(x['pre'] for x in runs):.2f}",
                     f"{mean(x['denoise'] for x in runs):.2f}", f"{mean(x['post'] for x in runs):.2f}",
                     f"{mean(x['wall'] for x in runs):.2f}"))
    if not rows:
        return
    table(f"(c) x2v generate, mean seconds per run from its progress bar (before: {before}; after: {after})",
          ["mode", "runs", "before denoising", "denoising", "after denoising", "total"], rows)


def report(a, model_dir, results, load_before, load_after) -> None:
    print(f"\nx2v stages benchmark: model {model_dir}")
    print(f"settings: {a.size}, {a.frames} frames, {a.steps} steps, guidance {a.guidance}, shift {a.shift}, "
          f"{a.jobs} jobs per run; CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={a.threads or 'unset'}; "
          f"load average before {load_before}, after {load_after}")
    model_table(model_dir)
    memory_tables(results)

    # (b) throughput
    rows = []
    base = {}
    for tag, r in results:
        if not r["mode"].startswith("disaggregated") and r["parallel"] == 1:
            base[tag.split("/")[0]] = a.jobs / r["makespan"] * 60
    ref = mean(base.values())
    for tag, r in results:
        jpm = a.jobs / r["makespan"] * 60
        if r["mode"].startswith("disaggregated"):
            lat = mean(j["latency"] for j in r["jobs"])
            cpu = sum(r["cpu"].values()) / a.jobs
        else:
            lat = mean(x["wall"] for x in r["runs"])
            cpu = sum(x["cpu"] for x in r["runs"]) / a.jobs
        rows.append((f"{r['mode']} [{tag}]", r["parallel"], f"{r['makespan']:.1f}", f"{jpm:.2f}", f"{lat:.1f}",
                     f"{cpu:.1f}", f"{jpm / ref:.2f}" if ref == ref else "-"))
    table(f"(b) Throughput, {a.jobs} jobs. Makespan: first start (monolithic) or submission (disaggregated) to "
          "the last completion. CPU s/job: user + system CPU of the x2v generate runs, or of the services "
          "(3 stages, gateway, redis) during the makespan. Ratio: jobs/min over the mean of the monolithic "
          "1-at-a-time rows",
          ["mode", "concurrency", "makespan s", "jobs/min", "mean job latency s", "CPU s/job", "ratio"], rows)

    if a.rounds > 1:
        modes: dict = {}
        for tag, r in results:
            d = modes.setdefault(r["mode"], {"rounds": 0, "makespan": 0.0, "cpu": 0.0, "parallel": r["parallel"]})
            d["rounds"] += 1
            d["makespan"] += r["makespan"]
            d["cpu"] += sum(r["cpu"].values()) if r["mode"].startswith("disaggregated") else sum(x["cpu"] for x in r["runs"])
        ref = next((a.jobs * d["rounds"] / d["makespan"] * 60 for m, d in modes.items()
                    if not m.startswith("disaggregated") and d["parallel"] == 1), float("nan"))
        rows = []
        for m, d in modes.items():
            jpm = a.jobs * d["rounds"] / d["makespan"] * 60
            rows.append((m, d["rounds"], f"{d['makespan']:.1f}", f"{jpm:.2f}", f"{d['cpu'] / (a.jobs * d['rounds']):.1f}",
                         f"{jpm / ref:.2f}" if ref == ref else "-"))
        table(f"(b) Throughput over all rounds ({a.jobs} jobs per round; jobs/min = all jobs / summed makespans)",
              ["mode", "rounds", "summed makespan s", "jobs/min", "CPU s/job", "ratio"], rows)

    # (c) per-stage timings
    rows = []
    sizing = []
    for tag, r in results:
        if not r["mode"].startswith("disaggregated"):
            continue
        means = stage_seconds(rows, tag, r)
        m = r["metrics"]
        device = {st: metric(m[st], "x2v_stage_step_seconds_sum") / max(1.0, metric(m[st], "x2v_stage_seconds_count", phase="run"))
                  for st in ["encoder", "dit", "decoder"]}
        step = metric(m["dit"], "x2v_stage_step_seconds_sum") / max(1.0, metric(m["dit"], "x2v_stage_step_seconds_count"))
        for label, t_enc, t_dit, t_dec in [
            ("device time: x2v_stage_step_seconds sum / jobs", device["encoder"], device["dit"], device["decoder"]),
            ("run phase mean (+ decoder finish)", means[("encoder", "run")], means[("dit", "run")],
             means[("decoder", "run")] + means[("decoder", "finish")]),
        ]:
            t_dit50 = t_dit + (50 - a.steps) * step
            sizing.append((f"disaggregated, {label} [{tag}]", f"{t_enc:.3f}", f"{t_dit:.3f}", f"{t_dec:.3f}",
                           f"{t_dit / t_enc:.1f}", f"{t_dec / t_dit:.2f}", f"{t_dit50 / t_enc:.0f}"))
    table(STAGE_SECONDS_TITLE, ["service", "phase", "count", "sum s", "mean s"], rows)
    transfers = []
    for tag, r in results:
        if r["mode"].startswith("disaggregated"):
            transfer_rows(transfers, tag, r)
    table(TRANSFER_TITLE, TRANSFER_HEADERS, transfers)
    generate_phases(results, "start-up, UMT5 load + encode, DiT load", "VAE load + decode, MP4, write")
    for tag, r in results:
        if r["mode"].startswith("disaggregated") or r["parallel"] != 1:
            continue
        runs = r["runs"]
        sizing.append((f"x2v generate, 1 at a time [{tag}]", "-", f"{mean(x['denoise'] for x in runs):.3f}", "-",
                       "-", "-", "-"))
    table("(c) Sizing, seconds per job and stage. Device time: from the start of a job's work on the stage's "
          "device thread to its last progress report (the encoder and decoder report once, at the end; the DiT "
          "after every step). The run phase also counts waiting for the device thread while another job holds "
          "it (encoder and decoder run 2 jobs at once here, capacity 2). Last column: t_dit at 50 steps "
          "(t_dit + (50 - steps) x mean DiT step)",
          ["source", "t_enc s", "t_dit s", "t_dec s", "T/E = t_dit/t_enc", "D/T = t_dec/t_dit", "T/E at 50 steps"],
          sizing)


def preview_steps(steps: int, k: int) -> list:
    """The steps after which the DiT takes a stream's previews (x2v's `preview_steps`)."""
    out = sorted({-(-j * steps // (k + 1)) for j in range(1, k + 1)} & set(range(1, steps)))
    return out


def report_qwen(a, model_dir, results, q, load_before, load_after) -> None:
    print(f"\nx2v stages benchmark, Qwen-Image text to image: model {model_dir}")
    print(f"settings: {a.size}, {a.steps} steps, guidance {a.guidance} (true CFG, negative prompt {NEGATIVE!r}), "
          f"{a.jobs} one-image jobs per run; CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={a.threads or 'unset'}; "
          f"load average before {load_before}, after {load_after}")
    model_table(model_dir)
    memory_tables(results + [("t2i, n=1", q["memory"])])

    rows = []
    for p in q["previews"]:
        what = "transformer + VAE decoder (default)" if p["previews"] else "transformer only"
        if p["previews"]:
            ks = sorted({x["k"] for x in q["stream"] if x["k"]})
            streamed = f"partial_images {','.join(map(str, ks))}"
        else:
            streamed = f"partial_images {p['k']} ({p['partials']} partial images sent)"
        rows.append((f"previews = {str(p['previews']).lower()}: {what}", mib(p["ready"]["VmRSS"]),
                     mib(p["ready"]["hwm"]), mib(p["jobs"]), f"{mib(p['streamed'])} ({streamed})"))
    on, off = q["previews"]
    rows.append(("difference (true - false)", mib(on["ready"]["VmRSS"] - off["ready"]["VmRSS"]),
                 mib(on["ready"]["hwm"] - off["ready"]["hwm"]), mib(on["jobs"] - off["jobs"]),
                 mib(on["streamed"] - off["streamed"])))
    table(f"(a) DiT stage, MiB, `previews` in its config (true: it also holds the VAE decoder, to decode the "
          f"partial images of streamed requests): RSS and VmHWM once ready, VmHWM after the one-image jobs "
          f"({a.jobs} at once), then after streamed requests; one DiT process each, the same encoder and decoder",
          ["DiT config", "RSS ready", "HWM ready", "peak after the jobs", "peak after streamed requests"],
          rows)

    rows = []
    stage_seconds(rows, "t2i, n=1", q["memory"])
    table(STAGE_SECONDS_TITLE + f", over the {a.jobs} one-image jobs", ["service", "phase", "count", "sum s", "mean s"],
          rows)
    transfers = []
    transfer_rows(transfers, "t2i, n=1", q["memory"])
    table(TRANSFER_TITLE, TRANSFER_HEADERS, transfers)
    generate_phases(results, "start-up, Qwen2.5-VL load + encode, DiT load", "VAE load + decode, PNG, write")

    rows = []
    per = {0: [], 1: []}
    for b in q["batch"]:
        per[b["image_batch"]] += b["seconds"]
        rows.append((f"image_batch = {b['image_batch']} ({'one batch of 4' if b['image_batch'] == 0 else 'back to back'})",
                     b["round"], ", ".join(f"{x:.1f}" for x in b["seconds"]), f"{mean(b['seconds']) / 4:.2f}",
                     f"{b['dit_run']:.1f}", f"{b['step']:.2f}", mib(b["peak"])))
    table("(c) n = 4 images per request, end to end (client.images.generate(n=4)); the DiT stage restarted with "
          "each `image_batch` (0: the 4 images in one batch per transformer forward, 1: one image at a time). "
          "DiT run: its x2v_stage_seconds{phase=run} mean; step: x2v_stage_step_seconds mean (one step of one "
          "batch: 4 steps per request batched, 16 back to back)",
          ["DiT config", "round", "s per request", "s per image", "DiT run s", "DiT s/step", "DiT peak RSS MiB"],
          rows)
    m0, m1 = mean(per[0]), mean(per[1])
    table("(c) n = 4 over all rounds: mean seconds per request; ratio = back to back / batched (> 1: batching is "
          "faster)", ["requests", "image_batch = 0 (batched) s", "image_batch = 1 (back to back) s", "ratio"],
          [(f"{len(per[0])} + {len(per[1])}", f"{m0:.1f}", f"{m1:.1f}", f"{m1 / m0:.2f}")])

    rows = []
    for x in q["stream"]:
        if x["k"]:
            rows.append((f"stream=True, partial_images={x['k']}", x["round"],
                         ",".join(map(str, preview_steps(a.steps, x["k"]))), x["partials"],
                         f"{x['first']:.2f}" if x["first"] is not None else "-",
                         f"{x['last']:.2f}" if x["last"] is not None else "-", f"{x['completed']:.2f}"))
        else:
            rows.append(("not streamed (reference)", x["round"], "", "", "", "", f"{x['completed']:.2f}"))
    table(f"(d) Time to the first partial image, n = 1, {a.steps} steps: seconds from the request to the first "
          "and the last `image_generation.partial_image` event and to `image_generation.completed` (not "
          "streamed: to the answer); previews after DiT steps as listed, each decoded in the DiT stage",
          ["request", "round", "preview after step", "partial events", "first partial s", "last partial s",
           "completed s"], rows)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--x2v", type=Path, help="x2v binary (default: $CARGO_TARGET_DIR/release/x2v)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "x2v-bench-stages",
                   help="scratch directory: cached models, configs, logs, outputs")
    p.add_argument("--family", choices=["wan", "qwen-image"], default="wan",
                   help="Wan2.1 text to video (default) or Qwen-Image text to image")
    p.add_argument("--model", choices=["mid", "demo"], default="mid")
    p.add_argument("--model-dir", help="an existing model directory of --family (Wan2.1 T2V, Qwen-Image T2I) "
                                       "instead of a random one")
    p.add_argument("--dit-heads", type=int, default=12)
    p.add_argument("--dit-head-dim", type=int, default=128)
    p.add_argument("--dit-ffn", type=int, default=8960)
    p.add_argument("--dit-layers", type=int, default=2)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--text-heads", type=int, default=16)
    p.add_argument("--text-ff", type=int, default=2816)
    p.add_argument("--text-layers", type=int, default=6)
    p.add_argument("--text-vocab", type=int, default=32128)
    p.add_argument("--qwen-text-heads", type=int, default=8, help="Qwen-Image: text encoder query heads")
    p.add_argument("--qwen-text-kv-heads", type=int, default=2)
    p.add_argument("--qwen-text-ff", type=int, default=5504)
    p.add_argument("--qwen-text-vocab", type=int, default=32768)
    p.add_argument("--vae-dim", type=int, default=96)
    p.add_argument("--jobs", type=int, help="jobs per run (default: 8 Wan, 2 Qwen-Image)")
    p.add_argument("--parallel", help="monolithic concurrency levels, comma-separated ('' skips; default: "
                                      "1,2 Wan, 1 Qwen-Image)")
    p.add_argument("--rounds", type=int, help="Wan: repeat the interleaved sequence (the order flips each round; "
                                              "default 2). Qwen-Image: rounds of the n = 4 comparison (default 2)")
    p.add_argument("--size", help="default: 128x128 Wan, 256x256 Qwen-Image")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, help="default: 5 Wan, 4 Qwen-Image (true CFG)")
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--pool-mib", type=int, default=256,
                   help="transfer.pool_mib of every stage (the shipped configs' 256: pre-faulted shared memory)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every x2v process (default: libtorch's)")
    p.add_argument("--partial-images", default="1,2,3", help="Qwen-Image: the streamed requests' partial_images")
    p.add_argument("--stream-rounds", type=int, default=1, help="Qwen-Image: repeat the streamed requests")
    p.add_argument("--batch-requests", type=int, default=1,
                   help="Qwen-Image: n = 4 requests per DiT start and round (one after another)")
    p.add_argument("--request-timeout", type=float, default=900.0, help="seconds one API request may take")
    p.add_argument("--write-model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.write_model:
        spec = json.loads(a.spec)
        (write_qwen_model if spec.get("family") == "qwen-image" else write_mid_model)(a.write_model, spec)
        return

    qwen = a.family == "qwen-image"
    for name, wan, qwen_image in [("jobs", 8, 2), ("parallel", "1,2", "1"), ("rounds", 2, 2),
                                  ("size", "128x128", "256x256"), ("guidance", 5.0, 4.0)]:
        if getattr(a, name) is None:
            setattr(a, name, qwen_image if qwen else wan)
    a.partial_images = [int(x) for x in a.partial_images.split(",") if x.strip()]
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/x2v/target"))
    binary = (a.x2v or target / "release" / "x2v").resolve()
    if not binary.exists():
        sys.exit(f"{binary} not found: cargo build --release -p x2v (or pass --x2v)")
    if not shutil.which("redis-server"):
        sys.exit("redis-server is not on PATH")
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    env = x2v_env(a)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        model_dir = prepare_model(a, binary, env)
        levels = [int(x) for x in a.parallel.split(",") if x.strip()]
        load_before = loadavg()
        results = []
        if qwen:
            for k in levels:
                results.append(("t2i, n=1", monolithic(a, binary, model_dir, env, k, f"qwen-p{k}")))
            q = qwen_disaggregated(a, binary, model_dir, env)
            report_qwen(a, model_dir, results, q, load_before, loadavg())
            return
        for rnd in range(1, a.rounds + 1):
            plan = [("mono", levels[0])] if levels else []
            plan += [("disagg", None)] + [("mono", k) for k in levels[1:]]
            if rnd % 2 == 0:
                plan.reverse()
            for kind, k in plan:
                tag = f"r{rnd}"
                if kind == "mono":
                    results.append((tag, monolithic(a, binary, model_dir, env, k, f"{tag}-p{k}")))
                else:
                    results.append((tag, disaggregated(a, binary, model_dir, env, tag)))
        report(a, model_dir, results, load_before, loadavg())
    finally:
        stop_all()


if __name__ == "__main__":
    main()
