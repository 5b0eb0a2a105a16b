"""x2v in real containers: the images docker/images.sh builds from the binaries this test run built,
docker/compose.cpu.yml (Redis, gateway, encoder, two DiT ranks, decoder; the demo model) with the
short leases of compose.test.yml, driven by the official openai client on the published port.

Needs a Docker Engine and docker-compose (1.29) or `docker compose` (v2); without them the suite is
skipped and says why. The first run bootstraps the Debian base with mmdebstrap (a Debian mirror);
later runs reuse it and docker's layer cache, so building the images costs the copy of the binaries.

Run: make test (or ~/.cache/x2v/venv/bin/python -m pytest tests/containers -q).
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from x2v_testing import ROOT, cargo_build, free_port, wait_for

API_KEY = "sk-x2v-containers"
MODEL = "x2v-demo"
# DiT services by rank (configs/x2v-demo/dit.toml and dit-1.toml).
DIT_SERVICES = {6: "dit-0", 7: "dit-1"}
# HTTP port (/metrics, /healthz) of each stage service in its container.
HTTP_PORTS = {"encoder": 9401, "dit-0": 9411, "dit-1": 9421, "decoder": 9431}
IMAGES = {"X2V_IMAGE": "x2v:test", "X2V_GATEWAY_IMAGE": "x2v-gateway:test"}
LEASE_S = 2.0


def compose_command():
    """docker-compose v1, or the v2 plugin; None when neither works."""
    for argv in (["docker-compose"], ["docker", "compose"]):
        if shutil.which(argv[0]) and subprocess.run(argv + ["version"], capture_output=True).returncode == 0:
            return argv
    return None


def docker_missing():
    """Why these tests cannot run here, or None."""
    if not shutil.which("docker"):
        return "no docker CLI on PATH"
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"no Docker Engine answers (`docker info`: {r.stderr.strip()[:200]})"
    if compose_command() is None:
        return "neither docker-compose nor `docker compose` is installed"
    return None


def pytest_collection_modifyitems(config, items):
    reason = docker_missing()
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=f"container tests need Docker: {reason}"))


class Stack:
    """One compose project of docker/compose.cpu.yml + compose.test.yml."""

    def __init__(self, workdir):
        self.project = f"x2vtest{os.getpid()}"
        self.port = free_port()
        secret = Path(workdir) / "transfer_secret"
        # The directory is private to this user; the containers' user reads the file through its mount.
        secret.write_text(os.urandom(24).hex())
        secret.chmod(0o444)
        self.env = dict(os.environ, GATEWAY_PORT=str(self.port), TRANSFER_SECRET_FILE=str(secret), **IMAGES)
        self.env.pop("TOPOLOGY", None)
        self.env.pop("MODELS_DIR", None)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.argv = compose_command() + ["-p", self.project, "-f", str(ROOT / "docker/compose.cpu.yml"),
                                         "-f", str(Path(__file__).parent / "compose.test.yml")]

    def compose(self, *args, timeout=300) -> str:
        r = subprocess.run(self.argv + list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"compose {' '.join(args)}: {r.stderr[-3000:]}"
        return r.stdout

    def container(self, service) -> str:
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"no container for {service}"
        return cid

    def docker(self, *args, timeout=120) -> str:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"docker {' '.join(args)}: {r.stderr[-2000:]}"
        return r.stdout

    def network(self) -> str:
        """The private (backend) network's name."""
        return f"{self.project}_backend"

    def health(self, service) -> str:
        return self.docker("inspect", "-f", "{{.State.Health.Status}}", self.container(service)).strip()

    def wait_healthy(self, service, timeout=120):
        wait_for(lambda: self.health(service) == "healthy", timeout=timeout, what=f"{service} healthy", every=0.5)

    def wait_serving(self, dit_ranks=None, timeout=180):
        """Waits until the gateway lists the demo model (live workers of every stage), with these DiT
        ranks live if given."""
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=10)

        def serving():
            try:
                models = {m.id: m for m in client.models.list()}
            except openai.APIError:
                return False
            model = models.get(MODEL)
            return model is not None and (
                dit_ranks is None or sorted(model.model_extra["x2v"]["ranks"]["dit"]) == dit_ranks)

        wait_for(serving, timeout=timeout, what=f"the gateway to list {MODEL} with DiT ranks {dit_ranks}",
                 every=0.5)

    def metrics(self, service) -> dict:
        """Prometheus samples of a stage service, read inside its container: name -> value (summed)."""
        port = HTTP_PORTS[service]
        # HTTP/1.0: the body comes whole (not chunked) and ends with the connection.
        script = (f"exec 3<>/dev/tcp/127.0.0.1/{port} && "
                  "printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3")
        response = self.docker("exec", self.container(service), "bash", "-c", script)
        head, _, text = response.partition("\n\n")  # (text mode has turned \r\n into \n)
        assert head.split(" ")[1] == "200", head
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)$", line.strip())
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out

    def logs(self, tail=60) -> str:
        r = subprocess.run(self.argv + ["logs", "--no-color", "--tail", str(tail)], env=self.env,
                           capture_output=True, text=True)
        return r.stdout + r.stderr

    def down(self):
        subprocess.run(self.argv + ["down", "-v", "--remove-orphans", "-t", "5"], env=self.env,
                       capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def images():
    """Builds the images from the binaries of this test run (docker/images.sh --bin-dir)."""
    executables = cargo_build()
    bin_dir = executables["x2v"].parent
    assert executables["x2v-gateway"].parent == bin_dir
    started = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "docker/images.sh"), "--bin-dir", str(bin_dir)],
                       env=dict(os.environ, **IMAGES), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"\n{r.stdout}images built in {time.monotonic() - started:.1f} s")
    return IMAGES


@pytest.fixture(scope="session")
def stack(images):
    workdir = tempfile.mkdtemp(prefix="x2v-containers-")
    s = Stack(workdir)
    try:
        started = time.monotonic()
        s.compose("up", "-d")
        s.wait_serving(dit_ranks=sorted(DIT_SERVICES))
        print(f"\ncompose up to serving: {time.monotonic() - started:.1f} s")
        yield s
    except BaseException:
        print(s.logs())
        raise
    finally:
        s.down()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def client(stack):
    import openai

    return openai.OpenAI(base_url=stack.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(autouse=True)
def logs_on_failure(request):
    """Prints the containers' recent output when a test fails."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "stack" in request.fixturenames:
        print(request.getfixturevalue("stack").logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
