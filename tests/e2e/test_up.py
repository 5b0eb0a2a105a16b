"""`x2v up`, the README's run command: gateway and all three stages in one process on the embedded
queue, serving the generated demo models to the official openai client: `x2v-demo` (videos) and
`x2v-demo-image` (a text-to-image and an edit stage set under one name)."""

import base64
import io
import os
import re
import signal
import subprocess

import openai
from PIL import Image

from x2v_testing import Process, ffprobe, free_port


def test_x2v_up_serves_the_demo_model(x2v_bin, tmp_path):
    port = free_port()
    up = Process("up", [str(x2v_bin), "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
                        "--device", "cpu"],
                 dict(os.environ, RUST_LOG="warn"), lambda l: l.startswith("x2v up: serving `"))
    try:
        assert "demo models" in up.log(), up.log()
        base_url = re.search(r"at (http://\S+/v1)", up.ready_line).group(1)
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["x2v-demo", "x2v-demo-image"]
        video = client.videos.create_and_poll(model="x2v-demo", prompt="a fox", size="256x256", seconds="2",
                                              poll_interval_ms=100, extra_body={"num_inference_steps": 2})
        assert video.status == "completed", video.error
        path = tmp_path / "fox.mp4"
        client.videos.download_content(video.id).write_to_file(path)
        assert ffprobe(path) == ("h264", 256, 256, 17, 8)
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


def png_size(b64: str) -> tuple[int, int]:
    """(width, height) of a base64 PNG, which must decode."""
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size
