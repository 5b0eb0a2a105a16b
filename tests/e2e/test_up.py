"""`x2v up`, the README's run command: gateway and all three stages in one process on the embedded
queue, serving the generated demo models to the official openai client: `x2v-demo` (videos) and
`x2v-demo-image` (a text-to-image and an edit stage set under one name)."""

import base64
import io
import os
import re
import signal
import subprocess
import types

import numpy as np
import openai
import pytest
from PIL import Image
from safetensors.numpy import save_file

from x2v_testing import Process, ffprobe, free_port


def start_up(x2v_bin, data_dir, *args):
    """`x2v up ARGS` on the CPU at a free port, once it says it serves, and an `openai` client for
    it. The caller stops the process (`up.kill()` in a `finally`)."""
    port = free_port()
    up = Process("up", [str(x2v_bin), "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(data_dir),
                        "--device", "cpu", *args],
                 dict(os.environ, RUST_LOG="warn"), lambda l: l.startswith("x2v up: serving `"))
    try:
        base_url = re.search(r"at (http://\S+/v1)", up.ready_line).group(1)
    except BaseException:
        up.kill()
        raise
    return up, openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def test_x2v_up_serves_the_demo_model(x2v_bin, tmp_path):
    up, client = start_up(x2v_bin, tmp_path)
    try:
        assert "demo models" in up.log(), up.log()
        assert [m.id for m in client.models.list()] == ["x2v-demo", "x2v-demo-image"]
        video = client.videos.create_and_poll(model="x2v-demo", prompt="a fox", size="256x256", seconds="2",
                                              poll_interval_ms=100, extra_body={"num_inference_steps": 2})
        assert video.status == "completed", video.error
        path = tmp_path / "fox.mp4"
        client.videos.download_content(video.id).write_to_file(path)
        assert ffprobe(path) == ("h264", 256, 256, 17, 8)
        # Video-to-video: the official client uploads the MP4 ...
        with open(path, "rb") as f:
            edit = client.videos.edit(prompt="a fox in the snow", video=("fox.mp4", f, "video/mp4"),
                                      extra_body={"num_inference_steps": 4, "strength": 0.5, "seed": 5})
        assert (edit.status, edit.model, edit.size, edit.seconds) == ("queued", "x2v-demo", "256x256", "2")
        edit = client.videos.poll(edit.id, poll_interval_ms=100)
        assert edit.status == "completed", edit.error
        edited = tmp_path / "edited.mp4"
        client.videos.download_content(edit.id).write_to_file(edited)
        assert ffprobe(edited) == ("h264", 256, 256, 17, 8)
        assert edited.read_bytes() != path.read_bytes()
        local = tmp_path / "edited-local.mp4"
        subprocess.run(
            [str(x2v_bin), "generate", "--model-dir", str(tmp_path / "demo-model"), "--task", "v2v",
             "--video", str(path), "--strength", "0.5", "--prompt", "a fox in the snow", "--size", "256x256",
             "--frames", "17", "--fps", "8", "--steps", "4", "--guidance", "5", "--shift", "3", "--seed", "5",
             "--out", str(local)],
            check=True, capture_output=True,
        )
        assert edited.read_bytes() == local.read_bytes(), "the served edit differs from x2v generate --task v2v"
        # ... or names a completed video (JSON `{"id"}`: the Python client refuses a reference).
        by_id = client.post("/videos/edits", cast_to=openai.types.Video,
                            body={"prompt": "a fox at night", "video": {"id": video.id},
                                  "num_inference_steps": 2, "strength": 1})
        by_id = client.videos.poll(by_id.id, poll_interval_ms=100)
        assert by_id.status == "completed", by_id.error
        with pytest.raises(openai.BadRequestError) as bad:
            client.videos.edit(prompt="x", video=("a.png", inputs_png(), "image/png"))
        assert bad.value.body["param"] == "video", bad.value.body
        image = client.images.generate(model="x2v-demo", prompt="a fox", size="256x256",
                                       extra_body={"num_inference_steps": 2})
        assert image.data[0].b64_json

        image = client.images.generate(model="x2v-demo-image", prompt="a fox", size="256x256", n=2,
                                       extra_body={"num_inference_steps": 2})
        assert [png_size(d.b64_json) for d in image.data] == [(256, 256)] * 2
        events = list(client.images.generate(model="x2v-demo-image", prompt="a fox", size="192x320", stream=True,
                                             partial_images=1, extra_body={"num_inference_steps": 3}))
        assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        assert png_size(events[0].b64_json) == (192, 320)
        inputs = []
        for i, (w, h) in enumerate([(96, 64), (48, 80)]):
            path = tmp_path / f"input{i}.png"
            Image.new("RGB", (w, h), (40 * i, 120, 200)).save(path)
            inputs.append(path)
        with open(inputs[0], "rb") as f1, open(inputs[1], "rb") as f2:
            edited = client.images.edit(model="x2v-demo-image", image=[f1, f2], prompt="picture 1 in picture 2",
                                        size="320x192", extra_body={"num_inference_steps": 2})
        assert png_size(edited.data[0].b64_json) == (320, 192)
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=30) == 0, up.log()
    finally:
        up.kill()


def inputs_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def png_size(b64: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG, which must decode."""
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


@pytest.fixture(scope="module")
def a14b(x2v_bin, tmp_path_factory):
    """`x2v up` serving a Wan2.2 A14B-shaped demo model (two experts) with two LoRA adapters in
    its `loras/`: `detail` (diffusers/PEFT keys) and `motion` (original Wan keys with alpha), and
    `wide`, made for another model."""
    tmp = tmp_path_factory.mktemp("a14b")
    model = tmp / "model"
    subprocess.run([str(x2v_bin), "demo-model", "--out", str(model), "--two-experts", "--seed", "3"],
                   check=True, capture_output=True)
    write_adapters(model / "loras")
    up, client = start_up(x2v_bin, tmp / "up", "--model-dir", model)
    try:
        yield types.SimpleNamespace(client=client, model=model, bin=x2v_bin, tmp=tmp, up=up)
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=30) == 0, up.log()
    finally:
        up.kill()


def write_adapters(loras):
    """Two adapters that fit the demo DiT (width 64, FFN 128, 2 blocks), one per key format."""
    loras.mkdir()
    rng = np.random.default_rng(5)
    detail = {}
    for i in range(2):
        for target in ("attn1.to_q", "attn1.to_v", "attn2.to_out.0"):
            detail[f"transformer.blocks.{i}.{target}.lora_A.weight"] = rng.normal(0, 0.5, (4, 64)).astype(np.float32)
            detail[f"transformer.blocks.{i}.{target}.lora_B.weight"] = rng.normal(0, 0.5, (64, 4)).astype(np.float32)
    save_file(detail, str(loras / "detail.safetensors"))
    motion = {}
    for i in range(2):
        prefix = f"diffusion_model.blocks.{i}.ffn.2"
        motion[f"{prefix}.lora_down.weight"] = rng.normal(0, 0.5, (2, 128)).astype(np.float32)
        motion[f"{prefix}.lora_up.weight"] = rng.normal(0, 0.5, (64, 2)).astype(np.float32)
        motion[f"{prefix}.alpha"] = np.array(1.0, dtype=np.float32)
    save_file(motion, str(loras / "motion.safetensors"))
    # `wide`: made for a model of width 96, which the DiT finds unfit when it loads.
    wide = {"transformer.blocks.0.attn1.to_q.lora_A.weight": rng.normal(0, 0.5, (4, 96)).astype(np.float32),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": rng.normal(0, 0.5, (96, 4)).astype(np.float32)}
    save_file(wide, str(loras / "wide.safetensors"))


SETTINGS = {"seed": 21, "num_inference_steps": 4, "guidance_scale": 5.0, "shift": 3.0, "negative_prompt": "blurry"}


def serve(a14b, name, **extra):
    video = a14b.client.videos.create_and_poll(model="wan2.2-t2v", prompt="a heron", size="832x480",
                                               extra_body=dict(SETTINGS, num_frames=5, **extra),
                                               poll_interval_ms=100)
    assert video.status == "completed", video.error
    path = a14b.tmp / f"{name}.mp4"
    a14b.client.videos.download_content(video.id).write_to_file(path)
    return path


def generate(a14b, name, *args):
    path = a14b.tmp / f"{name}.mp4"
    subprocess.run(
        [str(a14b.bin), "generate", "--model-dir", str(a14b.model), "--task", "t2v", "--prompt", "a heron",
         "--negative-prompt", "blurry", "--size", "832x480", "--frames", "5", "--steps", "4", "--guidance", "5",
         "--shift", "3", "--seed", "21", "--fps", "16", "--out", str(path), *args],
        check=True, capture_output=True,
    )
    return path


def test_x2v_up_serves_a_two_expert_model_as_x2v_generate_makes_it(a14b):
    """A Wan2.2 A14B-shaped model (high- and low-noise experts): served with a guidance scale per
    expert, the MP4 equals `x2v generate`'s with the same settings; one scale for both experts
    gives another video; the model is listed with its adapters."""
    models = a14b.client.models.list().data
    assert [m.id for m in models] == ["wan2.2-t2v"]
    assert models[0].model_extra["x2v"]["loras"] == ["detail", "motion"]
    two = serve(a14b, "two", guidance_scale_2=2.0)
    one = serve(a14b, "one", guidance_scale_2=5.0)
    assert ffprobe(two) == ("h264", 832, 480, 5, 16)
    local = generate(a14b, "local", "--guidance-2", "2")
    assert two.read_bytes() == local.read_bytes(), "the served MP4 differs from x2v generate's"
    assert one.read_bytes() != local.read_bytes(), "guidance_scale_2 made no difference"


def test_lora_jobs_compose_adapters_and_leave_the_base_model_untouched(a14b):
    """Adapters per request, composed with weights: the served video equals `x2v generate --lora`;
    a job without adapters after one with them equals one before them, byte for byte; an unknown
    adapter is refused with a 400 naming it."""
    # guidance_scale_2 left to the model's default (3.0, the Wan2.2 T2V A14B preset's).
    before = serve(a14b, "before")
    with_loras = serve(a14b, "with", lora=[{"name": "detail", "scale": 0.8}, {"name": "motion", "scale": 1.5}])
    after = serve(a14b, "after")
    assert with_loras.read_bytes() != before.read_bytes(), "the adapters made no difference"
    assert after.read_bytes() == before.read_bytes(), "a job after a LoRA job differs from one before it"
    local = generate(a14b, "local-lora", "--guidance-2", "3", "--lora", "detail:0.8", "--lora", "motion:1.5")
    assert with_loras.read_bytes() == local.read_bytes(), "the served LoRA video differs from x2v generate's"
    for lora, says in [([{"name": "sketch"}], "no LoRA adapter `sketch`"),
                       ([{"name": "wide"}], "`wide` does not fit model `wan2.2-t2v`"),
                       ([{"name": "detail"}, {"name": "detail"}], "twice"),
                       ([{"name": "detail", "scale": 99}], "scale"),
                       ([{"name": "../detail"}], "must be")]:
        with pytest.raises(openai.BadRequestError) as e:
            a14b.client.videos.create(model="wan2.2-t2v", prompt="a heron", size="832x480",
                                      extra_body={"lora": lora, "num_frames": 5})
        assert e.value.body["param"] == "lora" and says in e.value.body["message"], e.value.body


def test_x2v_up_serves_a_step_distilled_model_with_its_defaults(x2v_bin, tmp_path):
    """`--step-distill --base-lora`: every job runs the distillation adapter and the fixed 4-step
    sampler, with no CFG and shift 5 when the request does not say; the MP4 equals `x2v generate
    --sampler step-distill` with the same adapter; another step count is refused before queueing."""
    model = tmp_path / "model"
    subprocess.run([str(x2v_bin), "demo-model", "--out", str(model), "--seed", "4"], check=True, capture_output=True)
    loras = model / "loras"
    loras.mkdir()
    rng = np.random.default_rng(9)
    distill = {}
    for i in range(2):
        for target in ("attn1.to_q", "ffn.net.0.proj"):
            width = 128 if target.startswith("ffn") else 64
            distill[f"transformer.blocks.{i}.{target}.lora_A.weight"] = rng.normal(0, 0.5, (4, 64)).astype(np.float32)
            distill[f"transformer.blocks.{i}.{target}.lora_B.weight"] = rng.normal(0, 0.5, (width, 4)).astype(np.float32)
    save_file(distill, str(loras / "distill.safetensors"))
    up, client = start_up(x2v_bin, tmp_path / "up", "--model-dir", model, "--step-distill", "--base-lora",
                          "distill")
    try:
        video = client.videos.create_and_poll(model="wan2.1-t2v", prompt="a heron", size="832x480",
                                              extra_body={"num_frames": 5, "seed": 8}, poll_interval_ms=100)
        assert video.status == "completed", video.error
        assert video.model_extra["x2v"]["num_inference_steps"] == 4
        served = tmp_path / "served.mp4"
        client.videos.download_content(video.id).write_to_file(served)
        local = tmp_path / "local.mp4"
        subprocess.run(
            [str(x2v_bin), "generate", "--model-dir", str(model), "--task", "t2v", "--prompt", "a heron",
             "--size", "832x480", "--frames", "5", "--sampler", "step-distill", "--lora", "distill",
             "--seed", "8", "--fps", "16", "--out", str(local)],
            check=True, capture_output=True,
        )
        assert served.read_bytes() == local.read_bytes(), "the served MP4 differs from x2v generate's"
        # Without the adapter, or with the 50-step sampler, the video is another one.
        plain = tmp_path / "plain.mp4"
        subprocess.run(
            [str(x2v_bin), "generate", "--model-dir", str(model), "--task", "t2v", "--prompt", "a heron",
             "--size", "832x480", "--frames", "5", "--sampler", "step-distill", "--seed", "8", "--fps", "16",
             "--out", str(plain)],
            check=True, capture_output=True,
        )
        assert plain.read_bytes() != served.read_bytes()
        with pytest.raises(openai.BadRequestError) as bad:
            client.videos.create(model="wan2.1-t2v", prompt="a heron", extra_body={"num_inference_steps": 8})
        assert bad.value.body["param"] == "num_inference_steps", bad.value.body
        assert "from 4 to 4" in bad.value.body["message"], bad.value.body
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=30) == 0, up.log()
    finally:
        up.kill()


def test_x2v_up_serves_a_ti2v_model_for_text_and_image_to_video(x2v_bin, tmp_path):
    """A Wan2.2 TI2V-5B-shaped model (the Wan2.2 VAE, one 48-channel DiT) is served for text- and
    image-to-video under one name: each MP4 equals `x2v generate --task ti2v` with the same settings,
    and the uploaded first frame changes the video."""
    model = tmp_path / "model"
    subprocess.run([str(x2v_bin), "demo-model", "--out", str(model), "--ti2v", "--seed", "6"],
                   check=True, capture_output=True)
    first = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (176, 320, 3), dtype=np.uint8)).save(first)
    up, client = start_up(x2v_bin, tmp_path / "up", "--model-dir", model)
    try:
        assert [m.id for m in client.models.list().data] == ["wan2.2-ti2v"]
        settings = {"num_frames": 5, "seed": 4, "num_inference_steps": 3, "shift": 5.0}
        paths = {}
        for name, image in [("t2v", None), ("i2v", first)]:
            extra = {} if image is None else {"input_reference": ("first.png", image.read_bytes(), "image/png")}
            video = client.videos.create_and_poll(model="wan2.2-ti2v", prompt="a lighthouse", size="1280x704",
                                                  extra_body=settings, poll_interval_ms=100, **extra)
            assert video.status == "completed", video.error
            served = tmp_path / f"served-{name}.mp4"
            client.videos.download_content(video.id).write_to_file(served)
            assert ffprobe(served) == ("h264", 1280, 704, 5, 24)
            local = tmp_path / f"local-{name}.mp4"
            subprocess.run(
                [str(x2v_bin), "generate", "--model-dir", str(model), "--task", "ti2v", "--prompt", "a lighthouse",
                 "--size", "1280x704", "--frames", "5", "--steps", "3", "--shift", "5", "--seed", "4",
                 "--fps", "24", "--out", str(local), *([] if image is None else ["--image", str(image)])],
                check=True, capture_output=True,
            )
            assert served.read_bytes() == local.read_bytes(), f"the served {name} MP4 differs from x2v generate's"
            paths[name] = served
        assert paths["t2v"].read_bytes() != paths["i2v"].read_bytes(), "the first frame changed nothing"
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=30) == 0, up.log()
    finally:
        up.kill()
