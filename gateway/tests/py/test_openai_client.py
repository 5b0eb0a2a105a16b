"""The official `openai` client (pinned in the venv) against a real gateway, Redis and test worker."""

import base64
import io

import httpx
import openai
import pytest

from conftest import API_KEY, Gateway, Worker
from x2v_testing import wait_for

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4DwABAQEABRjYTgAAAABJRU5ErkJggg=="
)


def test_create_and_poll_runs_the_job_through_every_stage(client):
    video = client.videos.create_and_poll(prompt="a cat on a skateboard", seconds="2", size="832x480")
    assert video.status == "completed", video
    assert video.progress == 100
    assert video.seconds == "2" and video.size == "832x480"
    assert video.model == "wan2.1-t2v-1.3b"
    assert video.completed_at is not None and video.error is None


def test_create_reports_request_id_and_poll_hint(client):
    raw = client.videos.with_raw_response.create(prompt="headers")
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-poll-after-ms"] == "50"
    video = raw.parse()
    assert video.status in ("queued", "in_progress", "completed")
    assert client.videos.retrieve(video.id).id == video.id


def test_image_reference_upload_is_detected_by_content(client):
    video = client.videos.create_and_poll(prompt="animate it", input_reference=io.BytesIO(PNG))
    assert video.status == "completed"
    assert video.model == "wan2.1-i2v-14b-480p"


def test_list_paginates_with_after(client):
    ids = [client.videos.create(prompt=f"page {i}").id for i in range(5)]
    first = client.videos.list(limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    seen = [v.id for v in client.videos.list(limit=2, order="asc")]  # auto-paging follows after=last_id
    positions = [seen.index(i) for i in ids]
    assert positions == sorted(positions), "ascending order across pages"
    newest = client.videos.list(limit=1, order="desc").data[0]
    assert newest.id >= ids[-1]


def test_download_content_video_and_thumbnail(client):
    video = client.videos.create_and_poll(prompt="download me")
    data = client.videos.download_content(video.id).content
    assert data[4:8] == b"ftyp"
    assert video.id.removeprefix("video_").encode() in data
    thumb = client.videos.download_content(video.id, variant="thumbnail").content
    assert thumb.startswith(b"RIFF")
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id, variant="spritesheet")


def test_delete_removes_the_video_and_its_content(client):
    video = client.videos.create_and_poll(prompt="delete me")
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.download_content(video.id)


def test_delete_cancels_running_work(client):
    video = client.videos.create(prompt="[slow] cancel me", extra_body={"num_inference_steps": 40})
    wait_for(lambda: client.videos.retrieve(video.id).progress > 5, what="denoising to start")
    client.videos.delete(video.id)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_remix(client):
    source = client.videos.create_and_poll(prompt="original", seconds="2")
    remix = client.videos.remix(source.id, prompt="make it blue")
    assert remix.remixed_from_video_id == source.id
    done = client.videos.poll(remix.id)
    assert done.status == "completed" and done.seconds == "2"


def test_idempotency_key_never_creates_a_second_job(client):
    headers = {"Idempotency-Key": "e2e-key-1"}
    a = client.videos.create(prompt="once only", extra_headers=headers)
    b = client.videos.create(prompt="once only", extra_headers=headers)
    assert a.id == b.id
    # A seed the client chose is part of the request: the same key with another seed conflicts.
    seeded = {"Idempotency-Key": "e2e-key-2"}
    c = client.videos.create(prompt="once only", extra_headers=seeded, extra_body={"seed": 1})
    assert client.videos.create(prompt="once only", extra_headers=seeded, extra_body={"seed": 1}).id == c.id
    with pytest.raises(openai.ConflictError) as e:
        client.videos.create(prompt="once only", extra_headers=seeded, extra_body={"seed": 2})
    assert e.value.body["code"] == "idempotency_key_reused", e.value.body


def test_failed_job_is_returned_by_poll_not_raised(client):
    video = client.videos.create_and_poll(prompt="[fail] please")
    assert video.status == "failed"
    assert video.error.code == "internal_error"


def test_images_generate_b64_json(client):
    result = client.images.generate(model="qwen-image", prompt="a red fox", n=2, response_format="b64_json", size="1024x1024")
    assert len(result.data) == 2
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")
    assert result.size == "1024x1024"


def test_images_generate_url(client, stack):
    result = client.images.generate(prompt="a blue fox", response_format="url", n=None, quality=None)
    url = result.data[0].url
    got = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"})
    assert got.status_code == 200 and got.content.startswith(b"\x89PNG")


def test_images_generate_stream(client):
    events = list(client.images.generate(prompt="streamed", stream=True, partial_images=1))
    assert events and events[-1].type == "image_generation.completed"
    assert base64.b64decode(events[-1].b64_json).startswith(b"\x89PNG")


def test_images_edit_with_image_list_and_mask(client):
    result = client.images.edit(
        image=[("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")],
        mask=("m.png", PNG, "image/png"),
        prompt="add a hat",
    )
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")


def test_bad_request_maps_to_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.videos.create(prompt="too big", size="1280x720")
    assert err.value.status_code == 400
    assert err.value.param == "size"
    assert "832x480" in err.value.message and "1280x720" in err.value.message
    assert err.value.request_id.startswith("req_")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", output_format="gif")


def test_wrong_key_maps_to_authentication_error(stack):
    bad = openai.OpenAI(base_url=stack["gateway"].base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.videos.list()
    assert err.value.status_code == 401


def test_unknown_video_maps_to_not_found_error(client):
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve("video_0190f3a0b1c27d4e8f9a0b1c2d3e4f50")


def test_rate_limit_maps_to_rate_limit_error(stack):
    limited = Gateway(stack["binaries"]["gateway"], stack["redis"], stack["storage"],
                      X2V_AUTH__RATE_LIMIT_PER_S="0.01", X2V_AUTH__RATE_LIMIT_BURST="1")
    try:
        c = openai.OpenAI(base_url=limited.base_url, api_key=API_KEY, max_retries=0)
        c.videos.list()
        with pytest.raises(openai.RateLimitError) as err:
            c.videos.list()
        assert int(err.value.response.headers["retry-after"]) >= 1
    finally:
        limited.stop()


def test_jobs_survive_gateway_restart(client, stack):
    stack["worker"].kill()
    video = client.videos.create(prompt="survive the gateway")
    gw = stack["gateway"]
    gw.stop()
    gw.start()
    c = openai.OpenAI(base_url=gw.base_url, api_key=API_KEY, max_retries=0)
    assert c.videos.retrieve(video.id).status == "queued"
    stack["worker"] = Worker(stack["binaries"]["worker"], stack["redis"], stack["storage"])
    assert c.videos.poll(video.id).status == "completed"


def test_job_survives_worker_crash_mid_run(client, stack):
    video = client.videos.create(prompt="[slow] crash the worker", extra_body={"num_inference_steps": 4})
    wait_for(lambda: client.videos.retrieve(video.id).progress > 5, what="denoising to start")
    stack["worker"].kill()
    stack["worker"] = Worker(stack["binaries"]["worker"], stack["redis"], stack["storage"])
    done = client.videos.poll(video.id)
    assert done.status == "completed"
    assert client.videos.retrieve(video.id).model_extra["x2v"]["attempts"] >= 4, "a stage was redelivered"


def test_jobs_survive_redis_restart_with_aof(client, stack):
    video = client.videos.create_and_poll(prompt="survive redis")
    redis = stack["redis"]
    redis.kill()
    redis.start()
    c = openai.OpenAI(base_url=stack["gateway"].base_url, api_key=API_KEY, max_retries=2)
    again = wait_for(lambda: _retrieve_or_none(c, video.id), what="gateway to reconnect")
    assert again.status == "completed"
    assert c.videos.create_and_poll(prompt="after the restart").status == "completed"


def _retrieve_or_none(c, vid):
    try:
        return c.videos.retrieve(vid)
    except openai.APIError:
        return None
