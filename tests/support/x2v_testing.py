"""Helpers shared by x2v's Python test suites (gateway/tests/py, tests/e2e): free ports, polling
and a real `redis-server` on a free port."""

import shutil
import socket
import subprocess
import tempfile
import time


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
