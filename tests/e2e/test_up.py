"""`x2v up`, the README's run command: gateway and all three stages in one process on the embedded
queue, serving the generated demo model to the official openai client."""

import os
import re
import signal
import subprocess

import openai

from test_pipeline import ffprobe
from x2v_testing import Process, free_port


def test_x2v_up_serves_the_demo_model(x2v_bin, tmp_path):
    port = free_port()
    up = Process("up", [str(x2v_bin), "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
                        "--device", "cpu"],
                 dict(os.environ, RUST_LOG="warn"), lambda l: l.startswith("x2v up: serving `"))
    try:
        assert "demo model" in up.log(), up.log()
        base_url = re.search(r"at (http://\S+/v1)", up.ready_line).group(1)
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["x2v-demo"]
        video = client.videos.create_and_poll(model="x2v-demo", prompt="a fox", size="256x256", seconds="2",
                                              poll_interval_ms=100, extra_body={"num_inference_steps": 2})
        assert video.status == "completed", video.error
        path = tmp_path / "fox.mp4"
        client.videos.download_content(video.id).write_to_file(path)
        assert ffprobe(path) == ("h264", 256, 256, 17, 8)
        image = client.images.generate(model="x2v-demo", prompt="a fox", size="256x256",
                                       extra_body={"num_inference_steps": 2})
        assert image.data[0].b64_json
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=30) == 0, up.log()
    finally:
        up.kill()
