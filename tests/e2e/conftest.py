"""Multi-process end-to-end fixtures: a real redis-server, `x2v gateway` and one `x2v encoder`,
`x2v dit` and `x2v decoder` process per stage (two DiT ranks for text-to-video), on tiny
random-initialised demo models written by `x2v demo-model`, driven by the official openai client.

Run: make test (or ~/.cache/x2v/venv/bin/python -m pytest tests/e2e -q; builds the binaries first,
reusing what `make test-rust` built; CARGO_TARGET_DIR defaults to ~/.cache/x2v/target).
"""

import os
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from x2v_testing import Process, RedisServer, cargo_build, write_config

API_KEY = "sk-x2v-e2e"
SECRET = "e2e-transfer-secret-0123456789"
T2V, I2V = "demo-t2v", "demo-i2v"
# Short leases and heartbeats so that a killed worker's job moves on within seconds.
LEASE_MS, HEARTBEAT_TTL_MS = 2000, 1500


@pytest.fixture(scope="session")
def x2v_bin() -> Path:
    return cargo_build()["x2v"]


def tasks_of(task):
    """A task name, or a list of them (the T2V demo also does v2v: video edits)."""
    return task if isinstance(task, list) else [task]


def model_entry(name, task):
    return {
        "name": name, "tasks": tasks_of(task), "sizes": ["256x256", "512x512"], "fps": 8, "max_frames": 33,
        "default_seconds": 2, "default_steps": 4, "max_steps": 1000, "default_guidance_scale": 5.0,
        "default_shift": 3.0, "max_n": 1,
    }


class Stage(Process):
    """One stage service: `x2v encoder|dit|decoder` with its own JSON config."""

    @staticmethod
    def write_config(cluster, kind, model, model_dir, task, rank, transfer, extra=None):
        config = {
            "rank": rank, "model": model, "model_dir": str(model_dir), "tasks": tasks_of(task),
            "device": "cpu", "capacity": 1,
            "queue": {"backend": "redis", "redis_url": cluster.redis.url, "prefix": cluster.prefix},
            "transfer": {"secret": SECRET, "timeout_s": 20, **(transfer or {})},
            "storage": {"kind": "local", "path": cluster.storage},
            "worker": {"lease_ms": LEASE_MS, "heartbeat_ttl_ms": HEARTBEAT_TTL_MS, "max_poll_ms": 100,
                       "job_timeout_s": 120, "drain_timeout_s": 20},
            "grpc": {"listen": "127.0.0.1:0"}, "http": {"listen": "127.0.0.1:0"},
            "telemetry": {"log_format": "text", "log_level": "warn"},
            **(extra or {}),
        }
        return write_config(Path(cluster.dir) / f"{model}-{kind}-{rank}.json", config)

    def __init__(self, cluster, kind, model, model_dir, task, rank=0, transfer=None, extra=None):
        self.kind, self.model, self.rank = kind, model, rank
        path = self.write_config(cluster, kind, model, model_dir, task, rank, transfer, extra)
        env = dict(os.environ, RUST_LOG="warn")
        super().__init__(f"{model}/{kind}-{rank}", [str(cluster.bin), kind, "--config", str(path),
                                                     "--print-addr"],
                         env, lambda l: l.startswith(f"{kind} ready "))
        fields = dict(kv.split("=", 1) for kv in self.ready_line.split()[2:])
        self.http, self.transfer = fields["http"], fields["transfer"]

    def metrics(self, **labels) -> dict:
        """Prometheus samples whose labels include `labels`, summed over the rest: name -> value."""
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{([^}]*)\})?\s+(\S+)$", line)
            if not m:
                continue
            have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out


class Cluster:
    """Redis, the gateway and the stage services of both demo models."""

    def __init__(self, x2v_bin, workdir):
        self.bin, self.dir = x2v_bin, workdir
        self.prefix = "x2v-e2e"
        self.storage = os.path.join(workdir, "outputs")
        self.models = {T2V: Path(workdir) / "t2v", I2V: Path(workdir) / "i2v"}
        for name, path in self.models.items():
            argv = [str(x2v_bin), "demo-model", "--out", str(path)] + (["--i2v"] if name == I2V else [])
            subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        self.redis = RedisServer(workdir)
        self.procs = []
        self.gateway = self._gateway()
        self.stages = {}
        # Ranks are unique per stage across models: T2V takes encoder 0, DiT 0 and 1 (the second
        # is where a killed rank's job goes), decoder 0; I2V encoder 1, DiT 2, decoder 1.
        t2v = ["t2v", "v2v"]
        for kind, model, task, rank in [
            ("encoder", T2V, t2v, 0), ("dit", T2V, t2v, 0), ("dit", T2V, t2v, 1), ("decoder", T2V, t2v, 0),
            ("encoder", I2V, "i2v", 1), ("dit", I2V, "i2v", 2), ("decoder", I2V, "i2v", 1),
        ]:
            self.add_stage(kind, model, task, rank)

    def _gateway(self):
        config = {
            "queue": {"backend": "redis", "redis_url": self.redis.url, "prefix": self.prefix,
                      "maintain_interval_ms": 200},
            "storage": {"kind": "local", "path": self.storage},
            "auth": {"api_keys": [API_KEY]},
            "http": {"poll_after_ms": 50},
            "models": [model_entry(T2V, ["t2v", "v2v"]), model_entry(I2V, "i2v")],
            "telemetry": {"log_format": "text", "log_level": "warn"},
        }
        path = write_config(Path(self.dir) / "gateway.json", config)
        gw = Process("gateway", [str(self.bin), "gateway", "--config", str(path), "--listen", "127.0.0.1:0",
                                 "--print-addr"],
                     dict(os.environ, RUST_LOG="warn"), lambda l: l.startswith("listening on "))
        gw.addr = gw.ready_line.split()[-1]
        gw.base_url = f"http://{gw.addr}/v1"
        self.procs.append(gw)
        return gw

    def add_stage(self, kind, model, task, rank=0, transfer=None) -> Stage:
        stage = Stage(self, kind, model, self.models[model], task, rank, transfer)
        self.procs.append(stage)
        self.stages[(model, kind, rank)] = stage
        return stage

    def remove(self, stage: Stage):
        """Stops a stage service (SIGTERM: it drains and deregisters) and forgets it."""
        stage.terminate()
        del self.stages[(stage.model, stage.kind, stage.rank)]

    def stage_config(self, kind, model, task, rank):
        return Stage.write_config(self, kind, model, self.models[model], task, rank, None)

    def stage(self, model, kind, rank=0) -> Stage:
        return self.stages[(model, kind, rank)]

    def logs(self) -> str:
        return "\n".join(p.log() for p in self.procs)

    def close(self):
        for p in self.procs:
            p.kill()
        self.redis.kill()


@pytest.fixture(scope="session")
def cluster(x2v_bin):
    workdir = tempfile.mkdtemp(prefix="x2v-e2e-")
    c = Cluster(x2v_bin, workdir)
    yield c
    c.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(cluster):
    import openai

    return openai.OpenAI(base_url=cluster.gateway.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def logs_on_failure(request, cluster):
    """Prints the services' recent output when a test fails."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(cluster.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
