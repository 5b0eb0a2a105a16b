"""Failures across processes: cancellation mid-denoising, a DiT worker killed mid-job, and a payload
corrupted on the wire between the DiT and the decoder."""

import socket
import threading
import time

import pytest

from conftest import LEASE_MS, T2V
from x2v_testing import free_port, wait_for

# Big enough frames that one denoising step of the demo model takes a noticeable time on the CPU.
SLOW = {"model": T2V, "size": "512x512", "seconds": "4"}


def retrieve(client, vid):
    return client.videos.retrieve(vid)


def wait_in_dit(client, vid, min_step=1, timeout=120):
    """Waits until the DiT has finished `min_step` steps of the job; returns the video."""

    def ready():
        v = retrieve(client, vid)
        assert v.status not in ("failed", "completed"), f"job ended early: {v.status} {v.error}"
        x = v.model_extra["x2v"]
        return v if x["stage"] == "dit" and x["step"] >= min_step else None

    return wait_for(ready, timeout=timeout, what=f"step {min_step} of the DiT")


def test_cancel_releases_the_dit_worker_within_one_step(client, cluster):
    video = client.videos.create(prompt="cancel me", extra_body={"num_inference_steps": 500, "seed": 1},
                                 **SLOW)
    v = wait_in_dit(client, video.id, min_step=2)
    dit = cluster.stage(T2V, "dit", v.model_extra["x2v"]["ranks"]["dit"])
    steps_before = dit.metrics()["x2v_stage_step_seconds_count"]
    client.videos.delete(video.id)
    wait_for(lambda: dit.metrics()["x2v_stage_in_flight"] == 0, timeout=60, what="the DiT to go idle")
    m = dit.metrics()
    # The step running when the cancel arrived may finish (plus one that ended between the metrics
    # read and the DELETE); no further step starts.
    ran_after = m["x2v_stage_step_seconds_count"] - steps_before
    assert ran_after <= 2, f"{ran_after} steps ran after the cancel"
    assert m["x2v_stage_step_seconds_count"] < 500
    # The released worker takes the next job at once.
    done = client.videos.create_and_poll(model=T2V, prompt="next", size="256x256", seconds="2",
                                         poll_interval_ms=100, extra_body={"num_inference_steps": 2})
    assert done.status == "completed", done.error


def step_seconds(client, cluster, **job):
    """Runs a short clean job and returns its DiT's mean seconds per denoising step, measured on this
    machine as it is loaded now, and the finished video."""
    steps = 3
    before = {r: cluster.stage(T2V, "dit", r).metrics() for r in (0, 1)}
    done = client.videos.create_and_poll(model=T2V, prompt="no crash", poll_interval_ms=100,
                                         extra_body={"num_inference_steps": steps}, **job)
    assert done.status == "completed", done.error
    rank = done.model_extra["x2v"]["ranks"]["dit"]
    after = cluster.stage(T2V, "dit", rank).metrics()
    spent = after["x2v_stage_step_seconds_sum"] - before[rank]["x2v_stage_step_seconds_sum"]
    ran = after["x2v_stage_step_seconds_count"] - before[rank]["x2v_stage_step_seconds_count"]
    assert ran == steps, (ran, steps)
    return spent / ran, done


# Seconds of denoising the crash job should take on the surviving rank, whatever the machine's speed:
# long enough that the kill lands mid-job, short enough to end far inside the stage deadline.
CRASH_JOB_SECONDS = 8.0


def test_killed_dit_worker_hands_its_job_to_the_other_rank(client, cluster):
    job = {"size": "256x256", "seconds": "2"}
    step_s, clean = step_seconds(client, cluster, **job)
    # The job's length follows the measured step time, so a slower (or busier) machine runs fewer
    # steps rather than hitting the stage deadline.
    steps = max(8, min(400, round(CRASH_JOB_SECONDS / step_s)))
    video = client.videos.create(model=T2V, prompt="survive a crash",
                                 extra_body={"num_inference_steps": steps, "seed": 2}, **job)
    v = wait_in_dit(client, video.id, min_step=1)
    rank = v.model_extra["x2v"]["ranks"]["dit"]
    victim = cluster.stage(T2V, "dit", rank)
    victim.kill()  # SIGKILL: no drain, no release; only the lease expiry frees the job.
    killed_at = time.monotonic()
    try:
        done = wait_for(lambda: (r := retrieve(client, video.id)).status in ("completed", "failed") and r,
                        timeout=240, what="the job to end after the SIGKILL", every=0.2)
        assert done.status == "completed", (done.error, f"{steps} steps of {step_s:.3f} s")
        x = done.model_extra["x2v"]
        assert x["ranks"]["dit"] != rank, "the job must have moved to the surviving DiT rank"
        # The stage claims of a clean run, plus the DiT stage's redelivery.
        assert x["attempts"] == clean.model_extra["x2v"]["attempts"] + 1, (x, clean.model_extra["x2v"])
        # It moved once the lease ran out, not at some much later sweep.
        assert time.monotonic() - killed_at > LEASE_MS / 1000
    finally:
        cluster.add_stage("dit", T2V, "t2v", rank=rank)


class CorruptingProxy:
    """Forwards TCP connections to `target`, flipping one bit of the byte at `offset` of what the
    target sends back on each connection."""

    def __init__(self, target_port, offset):
        self.target, self.offset = ("127.0.0.1", target_port), offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.flips = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.offset), daemon=True).start()

    def _pump(self, src, dst, flip_at):
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if flip_at is not None and seen <= flip_at < seen + len(data):
                    data = bytearray(data)
                    data[flip_at - seen] ^= 0x40
                    self.flips += 1
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_payload_corrupted_in_flight_is_caught_by_sha256(client, cluster):
    # A DiT rank whose advertised transfer address is a proxy that corrupts what it serves, and a
    # decoder rank that must use TCP (shared memory would bypass the proxy). The job is pinned to both.
    port = free_port()
    # Phase2 of a 256x256, 17-frame job is 16x5x32x32 fp32 latents (320 KiB): the flipped byte lies
    # well inside the tensor bytes, past the handshake and manifest.
    proxy = CorruptingProxy(port, offset=200_000)
    dit = cluster.add_stage("dit", T2V, "t2v", rank=7, transfer={
        "listen": f"127.0.0.1:{port}", "advertise": f"127.0.0.1:{proxy.port}", "transport": "tcp"})
    decoder = cluster.add_stage("decoder", T2V, "t2v", rank=7, transfer={"transport": "tcp"})
    try:
        video = client.videos.create_and_poll(
            model=T2V, prompt="corrupt me", size="256x256", seconds="2", poll_interval_ms=100,
            extra_body={"num_inference_steps": 2, "dit_engine_rank": 7, "decoder_engine_rank": 7})
        assert video.status == "failed"
        assert video.error.code == "transfer_integrity", video.error
        assert "SHA-256" in video.error.message and "`latents`" in video.error.message, video.error
        assert proxy.flips >= 1
        with pytest.raises(Exception):
            client.videos.download_content(video.id)
    finally:
        for stage in (dit, decoder):
            cluster.remove(stage)
        proxy.close()
