"""A video request through the disaggregated pipeline: gateway -> encoder -> DiT -> decoder, each a
separate process, jobs in Redis, payloads over x2v-transfer, driven by the official openai client."""

import io
import subprocess

import numpy as np
import openai
import pytest
from PIL import Image

from conftest import I2V, T2V
from x2v_testing import decode_frames, ffprobe

FPS = 8


def run(client, tmp_path, name, **kwargs):
    video = client.videos.create_and_poll(poll_interval_ms=100, **kwargs)
    assert video.status == "completed", video.error
    path = tmp_path / f"{name}.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    return video, path


def test_text_to_video_runs_through_three_services(client, cluster, tmp_path):
    video, path = run(client, tmp_path, "t2v", model=T2V, prompt="a red fox in the snow", size="256x256",
                      seconds="2", extra_body={"seed": 7, "num_inference_steps": 3})
    assert ffprobe(path) == ("h264", 256, 256, 17, FPS)
    assert video.progress == 100
    extra = video.model_extra["x2v"]
    assert extra["num_frames"] == 17 and extra["fps"] == FPS
    # Every stage really ran in its own service: each one counted the job.
    for kind in ["encoder", "dit", "decoder"]:
        done = sum(s.metrics(outcome="completed").get("x2v_stage_jobs_total", 0)
                   for (m, k, _), s in cluster.stages.items()
                   if m == T2V and k == kind)
        assert done >= 1, f"no {kind} of {T2V} reports a job"
    # The DiT and the decoder each fetched their input and timed it.
    for kind in ["dit", "decoder"]:
        stages = [s for (m, k, _), s in cluster.stages.items() if m == T2V and k == kind]
        timed = [s.metrics() for s in stages]
        assert sum(t.get("x2v_transfer_seconds_count", 0) for t in timed) >= 1, kind
        assert sum(t.get("x2v_transfer_seconds_sum", 0) for t in timed) > 0, kind
        received = sum(s.metrics(direction="in").get("x2v_transfer_bytes_total", 0) for s in stages)
        assert received > 0, kind
    for variant in ["thumbnail", "spritesheet"]:
        content = client.videos.download_content(video.id, variant=variant).read()
        assert len(content) > 0


def test_image_to_video_uses_the_uploaded_first_frame(client, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (320, 200), (200, 40, 40)).save(png, format="PNG")
    png.seek(0)
    video, path = run(client, tmp_path, "i2v", model=I2V, prompt="it starts to move", size="256x256",
                      seconds="4", input_reference=("first.png", png, "image/png"),
                      extra_body={"seed": 3, "num_inference_steps": 2})
    assert ffprobe(path) == ("h264", 256, 256, 33, FPS)


def test_a_video_is_extended_from_its_last_frame_and_edited(client, tmp_path):
    source, src_path = run(client, tmp_path, "source", model=T2V, prompt="a red fox in the snow", size="256x256",
                           seconds="2", extra_body={"seed": 5, "num_inference_steps": 2})
    # Extension, with the official client's upload: the 17 frames of the source, then 16 new ones.
    with open(src_path, "rb") as f:
        ext = client.videos.extend(prompt="the fox runs away", seconds="2", video=("fox.mp4", f, "video/mp4"),
                                   extra_body={"model": I2V, "seed": 6, "num_inference_steps": 2})
    assert (ext.model, ext.seconds, ext.size) == (I2V, "4", "256x256")
    ext = client.videos.poll(ext.id, poll_interval_ms=100)
    assert ext.status == "completed", ext.error
    path = tmp_path / "extended.mp4"
    client.videos.download_content(ext.id).write_to_file(path)
    assert ffprobe(path) == ("h264", 256, 256, 33, FPS)
    src, out = decode_frames(src_path).astype(float), decode_frames(path).astype(float)
    # The source's frames come first (re-encoded once more: the demo's noise-like frames lose ~8
    # levels on average), then frames the source does not have (~60 levels from its last frame).
    head = np.abs(out[:17] - src).mean()
    tail = np.abs(out[17:] - src[-1]).mean()
    assert head < 15 and tail > 4 * head, (head, tail)
    # Edit of the extension by id (the JSON reference the Python client cannot send).
    edit = client.post("/videos/edits", cast_to=openai.types.Video,
                       body={"model": T2V, "prompt": "at night", "video": {"id": ext.id}, "strength": 0.5,
                             "num_inference_steps": 4})
    edit = client.videos.poll(edit.id, poll_interval_ms=100)
    assert edit.status == "completed", edit.error
    # The 33 frames at 8 fps fit the model's 33-frame limit whole.
    assert edit.model_extra["x2v"]["num_frames"] == 33 and edit.seconds == "4"


def test_served_video_equals_x2v_generate(client, cluster, tmp_path):
    prompt = "waves breaking on a rocky shore"
    _, served = run(client, tmp_path, "served", model=T2V, prompt=prompt, size="256x256", seconds="2",
                    extra_body={"seed": 1234, "num_inference_steps": 4, "guidance_scale": 5.0, "shift": 3.0,
                                "negative_prompt": "blurry"})
    local = tmp_path / "local.mp4"
    subprocess.run(
        [str(cluster.bin), "generate", "--model-dir", str(cluster.models[T2V]), "--task", "t2v",
         "--prompt", prompt, "--negative-prompt", "blurry", "--size", "256x256", "--frames", "17",
         "--steps", "4", "--guidance", "5", "--shift", "3", "--seed", "1234", "--fps", str(FPS),
         "--out", str(local)],
        check=True, capture_output=True,
    )
    assert served.read_bytes() == local.read_bytes(), "the served MP4 differs from x2v generate's"


@pytest.mark.parametrize("kwargs, param", [
    ({"size": "300x200"}, "size"),
    ({"extra_body": {"num_frames": 18}}, "num_frames"),
])
def test_bad_requests_are_rejected_before_queueing(client, kwargs, param):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.videos.create(model=T2V, prompt="x", **kwargs)
    assert e.value.body["param"] == param


def test_a_rank_live_for_another_model_is_refused(cluster):
    # Encoder rank 0 serves the T2V model; an I2V encoder may not take that rank too (they would
    # share its queue), and says so before loading any weights.
    path = cluster.stage_config("encoder", I2V, "i2v", rank=0)
    r = subprocess.run([str(cluster.bin), "encoder", "--config", str(path)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert "encoder rank 0 is already live for model(s)" in r.stderr and T2V in r.stderr, r.stderr
