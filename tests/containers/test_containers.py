"""The CPU compose topology in real containers: a video and an image job end to end, then faults
injected with Docker itself while jobs run: a DiT container killed, the decoder cut off its network,
Redis restarted with jobs queued, the gateway restarted under a polling client. Every job must end
`completed` (or `failed` with a clear error) inside its deadline.

Jobs are held at known points (the DiT's step counter in the job's status) and sized from the DiT
step time measured here, so the faults land mid-job on a fast machine and a slow one alike."""

import base64
import io
import threading
import time

import openai
import pytest
from PIL import Image
from x2v_testing import ffprobe, wait_for

from conftest import DIT_SERVICES, LEASE_S, MODEL

JOB = {"model": MODEL, "size": "256x256", "seconds": "2"}
# The jobs faults are injected into: 9 frames, which halves the decoder's work.
SHORT = {**JOB, "seconds": "1"}
# Seconds of denoising of a job a fault should land in, whatever the machine's speed: long enough to
# break something mid-job, short enough to end far inside the stage deadline (120 s).
HELD_JOB_SECONDS = 6.0


def ended(client, vid):
    v = client.videos.retrieve(vid)
    return v if v.status in ("completed", "failed") else None


def wait_ended(client, vid, timeout=180):
    return wait_for(lambda: ended(client, vid), timeout=timeout, what=f"job {vid} to end", every=0.2)


def wait_in_dit(client, vid, min_step=1, timeout=120):
    """Waits until the DiT has finished `min_step` steps of the job; returns the video."""

    def ready():
        v = client.videos.retrieve(vid)
        assert v.status not in ("failed", "completed"), f"job ended early: {v.status} {v.error}"
        x = v.model_extra["x2v"]
        return v if x["stage"] == "dit" and x["step"] >= min_step else None

    return wait_for(ready, timeout=timeout, what=f"step {min_step} of the DiT", every=0.1)


def assert_video(client, tmp_path, video, name, frames=9):
    assert video.status == "completed", video.error
    path = tmp_path / f"{name}.mp4"
    client.videos.download_content(video.id).write_to_file(path)
    assert ffprobe(path) == ("h264", 256, 256, frames, 8)


@pytest.fixture(scope="module")
def step_s(stack, client):
    """Mean seconds per DiT step of the demo model in a container, measured on a clean job after a
    job on each rank (a rank's first steps are slower: they would make the held jobs short)."""
    for rank in DIT_SERVICES:
        warm = client.videos.create_and_poll(prompt="warm up", poll_interval_ms=100,
                                             extra_body={"num_inference_steps": 2, "dit_engine_rank": rank},
                                             **SHORT)
        assert warm.status == "completed", warm.error
    steps = 3
    before = {s: stack.metrics(s) for s in DIT_SERVICES.values()}
    done = client.videos.create_and_poll(prompt="measure", poll_interval_ms=100,
                                         extra_body={"num_inference_steps": steps}, **SHORT)
    assert done.status == "completed", done.error
    service = DIT_SERVICES[done.model_extra["x2v"]["ranks"]["dit"]]
    after = stack.metrics(service)
    # A rank that has run no step yet reports no samples.
    ran = after["x2v_stage_step_seconds_count"] - before[service].get("x2v_stage_step_seconds_count", 0)
    assert ran == steps, (ran, steps)
    return (after["x2v_stage_step_seconds_sum"] - before[service].get("x2v_stage_step_seconds_sum", 0)) / ran


def held_steps(step_s, seconds=HELD_JOB_SECONDS):
    return max(20, min(1000, round(seconds / step_s)))


def test_video_and_image_jobs_through_the_containers(stack, client, tmp_path):
    started = time.monotonic()
    video = client.videos.create_and_poll(prompt="a red fox in the snow", poll_interval_ms=100,
                                          extra_body={"seed": 7, "num_inference_steps": 3}, **JOB)
    latency = time.monotonic() - started
    assert_video(client, tmp_path, video, "t2v", frames=17)
    x = video.model_extra["x2v"]
    assert x["ranks"]["dit"] in DIT_SERVICES, x
    image = client.images.generate(model=MODEL, prompt="a red fox", size="320x192",
                                   extra_body={"num_inference_steps": 3})
    png = base64.b64decode(image.data[0].b64_json)
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (320, 192)
    print(f"\nvideo job {latency:.1f} s, image job {time.monotonic() - started - latency:.1f} s")


def test_killed_dit_container_hands_its_job_to_the_other_rank(stack, client, step_s, tmp_path):
    steps = held_steps(step_s)
    video = client.videos.create(prompt="survive a crash", extra_body={"num_inference_steps": steps, "seed": 2},
                                 **SHORT)
    rank = wait_in_dit(client, video.id).model_extra["x2v"]["ranks"]["dit"]
    victim = DIT_SERVICES[rank]
    # SIGKILL: no drain, no release; only the lease expiry frees the job. Docker does not restart a
    # container it was told to kill, so the other rank must take the job.
    stack.docker("kill", stack.container(victim))
    killed_at = time.monotonic()
    try:
        done = wait_ended(client, video.id)
        assert done.status == "completed", (done.error, f"{steps} steps of {step_s:.3f} s")
        x = done.model_extra["x2v"]
        assert x["ranks"]["dit"] != rank, "the job must have moved to the surviving DiT rank"
        assert time.monotonic() - killed_at > LEASE_S, "it moved before the lease ran out"
        assert_video(client, tmp_path, done, "moved")
    finally:
        stack.compose("start", victim)
        stack.wait_serving(dit_ranks=sorted(DIT_SERVICES))


def test_decoder_cut_off_its_network_finishes_the_job_once_back(stack, client, step_s, tmp_path):
    steps = held_steps(step_s, 3.0)
    decoder = stack.container("decoder")
    video = client.videos.create(prompt="wait for the decoder", extra_body={"num_inference_steps": steps},
                                 **SHORT)
    wait_in_dit(client, video.id)
    stack.docker("network", "disconnect", stack.network(), decoder)
    try:
        # The DiT finishes; the decoder can reach neither Redis nor the DiT, so the job waits for it
        # (its heartbeat lapses meanwhile) instead of completing or failing.
        wait_for(lambda: client.videos.retrieve(video.id).model_extra["x2v"]["stage"] not in ("encoder", "dit"),
                 timeout=60, what="the DiT to hand the job on", every=0.2)
        time.sleep(2 * LEASE_S)
        v = client.videos.retrieve(video.id)
        assert v.status not in ("completed", "failed"), (v.status, v.error)
    finally:
        stack.docker("network", "connect", "--alias", "decoder", stack.network(), decoder)
    done = wait_ended(client, video.id, timeout=120)
    assert_video(client, tmp_path, done, "reconnected")


def test_redis_restart_with_jobs_queued(stack, client, step_s):
    # Three jobs for two DiT ranks: two run, one waits in Redis when Redis goes down (SIGTERM: it
    # writes its append-only file and stops; the AOF brings the queue back).
    steps = held_steps(step_s, 2.0)
    ids = [client.videos.create(prompt=f"queued {i}", extra_body={"num_inference_steps": steps, "seed": i},
                                **SHORT).id for i in range(3)]
    wait_in_dit(client, ids[0])
    # Both ranks busy for seconds yet: one job has not started denoising.
    before = [client.videos.retrieve(vid).model_extra["x2v"] for vid in ids]
    assert any(x["stage"] != "dit" or x["step"] == 0 for x in before), before
    stack.docker("restart", "-t", "10", stack.container("redis"))
    stack.wait_healthy("redis", timeout=60)
    for vid in ids:
        done = wait_ended(client, vid, timeout=180)
        assert done.status == "completed", (done.error, before)


def test_gateway_restart_under_a_polling_client(stack, client, step_s, tmp_path):
    steps = held_steps(step_s, 3.0)
    video = client.videos.create(prompt="keep polling", extra_body={"num_inference_steps": steps}, **SHORT)
    wait_in_dit(client, video.id)
    restarted = {}

    # The official client's own retries (exponential backoff) carry the polling across the restart.
    patient = openai.OpenAI(base_url=stack.base_url, api_key=client.api_key, max_retries=8, timeout=10)

    def restart():
        stack.docker("restart", "-t", "10", stack.container("gateway"))
        restarted["then"] = patient.videos.retrieve(video.id).status

    thread = threading.Thread(target=restart)
    thread.start()
    done = patient.videos.poll(video.id, poll_interval_ms=100)
    thread.join()
    # The gateway was back while the job still ran: the polling really spanned the restart.
    assert restarted.get("then") in ("queued", "in_progress"), restarted
    assert_video(patient, tmp_path, done, "after-restart")
