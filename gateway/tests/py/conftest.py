"""End-to-end fixtures: a real redis-server with AOF on a free port (tests/support/x2v_testing.py),
the x2v-gateway binary on port 0 and the test worker (the x2v-queue `test_worker` example)
completing jobs through the worker API.

Run: ~/.cache/x2v/venv/bin/python -m pytest gateway/tests/py -q
(builds the binaries first, reusing what `make test-rust` built; CARGO_TARGET_DIR defaults to ~/.cache/x2v/target).
"""

import os
import subprocess
import tempfile

import pytest
from x2v_testing import Process, RedisServer, cargo_build

API_KEY = "sk-x2v-test"


@pytest.fixture(scope="session")
def binaries():
    built = cargo_build()
    return {"gateway": built["x2v-gateway"], "worker": built["test_worker"]}


class Gateway:
    def __init__(self, binary, redis, storage, **env):
        self.binary, self.redis, self.storage, self.extra = binary, redis, storage, env
        self.proc = None
        self.start()

    def start(self):
        env = dict(os.environ)
        env.update({
            "X2V_QUEUE__REDIS_URL": self.redis.url,
            "X2V_QUEUE__MAINTAIN_INTERVAL_MS": "200",
            "X2V_STORAGE__PATH": self.storage,
            "X2V_AUTH__API_KEYS": f'["{API_KEY}"]',
            "X2V_HTTP__POLL_AFTER_MS": "50",
            "RUST_LOG": "warn",
        })
        env.update(self.extra)
        self.proc = Process("gateway", [str(self.binary), "--listen", "127.0.0.1:0", "--print-addr"], env,
                            lambda line: line.startswith("listening on "))
        self.addr = self.proc.ready_line.split()[-1]
        self.base_url = f"http://{self.addr}/v1"

    def stop(self):
        try:
            self.proc.terminate(timeout=10)
        except subprocess.TimeoutExpired:
            pass  # terminate() has killed it


class Worker:
    def __init__(self, binary, redis, storage):
        env = dict(os.environ, X2V_TEST_WORKER_LEASE_MS="1000")
        self.proc = subprocess.Popen([str(binary), redis.url, storage], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "test worker ready"

    def kill(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def stack(binaries):
    redis = RedisServer(aof=True)
    storage = tempfile.mkdtemp(prefix="x2v-outputs-")
    gateway = Gateway(binaries["gateway"], redis, storage)
    worker = Worker(binaries["worker"], redis, storage)
    state = {"redis": redis, "gateway": gateway, "worker": worker, "storage": storage, "binaries": binaries}
    yield state
    state["worker"].kill()
    gateway.stop()
    redis.kill()


@pytest.fixture
def client(stack):
    import openai

    return openai.OpenAI(base_url=stack["gateway"].base_url, api_key=API_KEY, max_retries=0, timeout=60)
