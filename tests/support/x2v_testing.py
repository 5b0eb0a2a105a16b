"""Helpers shared by x2v's Python test suites (gateway/tests/py, tests/e2e, tests/containers): building
the binaries, free ports, polling, service processes with a ready line, config files, a real
`redis-server` on a free port and `ffprobe` of a video."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/x2v/target"))


def cargo_build() -> dict:
    """Builds the workspace's binaries and examples with the features `make test-rust` (`cargo test
    --workspace --all-targets`) resolves, so that after it only the examples' own `main`s compile and
    every crate compiles once per run. Returns the executables by target name."""
    env = dict(os.environ, CARGO_TARGET_DIR=str(TARGET), LIBTORCH_USE_PYTORCH="1")
    out = subprocess.run(["cargo", "build", "-q", "--workspace", "--bins", "--examples",
                          "--message-format=json-render-diagnostics"], cwd=ROOT, env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    executables = {}
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and not msg["profile"]["test"]:
            executables[msg["target"]["name"]] = Path(msg["executable"])
    return executables


def write_config(path, config: dict) -> Path:
    """Writes a service config as JSON (the services read JSON configs as they read TOML)."""
    path = Path(path)
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=60.0, what="condition", every=0.05):
    """Calls `predicate` every `every` seconds until it returns something true, and returns that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """`redis-server` on a free port of 127.0.0.1, its files in `workdir` (a new temporary directory
    by default). With `aof`, every write is fsynced to the append-only file, so a `kill()` then
    `start()` keeps the data."""

    def __init__(self, workdir=None, aof=False):
        assert shutil.which("redis-server"), "redis-server must be on PATH (apt-get install redis-server)"
        self.dir = workdir or tempfile.mkdtemp(prefix="x2v-redis-")
        self.aof = aof
        self.port = free_port()
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.ping, what="redis-server")

    def ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self):
        self.proc.kill()
        self.proc.wait()


class Process:
    """A service child process, started and waited on until it prints its ready line (`ready(line)`
    is true). Its output (stdout and stderr) is drained so it never blocks on a full pipe, and the
    last lines are kept for failure messages."""

    def __init__(self, name, argv, env, ready, timeout=120):
        self.name = name
        self.tail = deque(maxlen=60)
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.ready_line = None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())
            if ready(line):
                self.ready_line = line.strip()
                break
            if time.monotonic() > deadline:
                break
        if self.ready_line is None:
            self.proc.kill()
            raise RuntimeError(f"{name} did not become ready:\n" + self.log())
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stdout:
            self.tail.append(line.rstrip())

    def log(self) -> str:
        return "\n".join(f"[{self.name}] {l}" for l in self.tail)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self):
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def terminate(self, timeout=30):
        """SIGTERM, then the exit status; killed and re-raised if it does not exit in `timeout`."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def ffprobe(path):
    """(codec, width, height, frame count, fps) of the first video stream, counted by decoding."""
    assert shutil.which("ffprobe"), "ffprobe must be on PATH (apt-get install ffmpeg)"
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
         "stream=codec_name,width,height,nb_read_frames,r_frame_rate", "-of", "json", str(path)],
        check=True, capture_output=True, text=True,
    ).stdout
    s = json.loads(out)["streams"][0]
    num, den = s["r_frame_rate"].split("/")
    return s["codec_name"], s["width"], s["height"], int(s["nb_read_frames"]), int(num) / int(den)


def decode_frames(path):
    """The frames of a video as RGB uint8 `[F, H, W, 3]`, decoded by ffmpeg."""
    import numpy as np

    _, width, height, _, _ = ffprobe(path)
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"],
        check=True, capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)
