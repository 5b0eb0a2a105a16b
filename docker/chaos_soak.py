#!/usr/bin/env python3
"""Chaos soak of the CPU compose topology: brings up docker/compose.cpu.yml with the short leases of
tests/containers/compose.test.yml (its own compose project), submits N video jobs of the demo model
at a steady rate with the official openai client, and meanwhile injects faults into the containers
on a seeded schedule: `docker kill` (then `docker start` after a delay: the restart policy leaves a
killed container down), `docker pause`/`unpause`, `docker network disconnect`/`connect`. Prints a
table: jobs completed, failed (by error), lost (the gateway no longer knows them), stuck (not ended by
their deadline), latency of the completed ones, the longest stall, and the faults with their times.
Tears the project down (`down -v`) at the end, on errors and on Ctrl-C.

  ~/.cache/x2v/venv/bin/python docker/chaos_soak.py --jobs 30 --rate 0.5 --fault-every 10 --seed 1
  ~/.cache/x2v/venv/bin/python docker/chaos_soak.py --base-url http://127.0.0.1:8000/v1 --jobs 20

With --base-url it measures an already running gateway (compose or plain processes) and injects
nothing. Exit status 0 when no job was lost or stuck and every failure carries an error, else 1.
"""

import argparse
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import openai

# The openai client warns on every videos call that the hosted Sora API is scheduled to end; x2v
# serves the same API itself.
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"openai|__main__")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILES = [ROOT / "docker/compose.cpu.yml", ROOT / "tests/containers/compose.test.yml"]
# compose.test.yml sets this key on the gateway.
TEST_API_KEY = "sk-x2v-containers"
MODEL = "x2v-demo"
STAGES = ["encoder", "dit-0", "dit-1", "decoder"]
# DiT ranks of configs/x2v-demo/dit.toml and dit-1.toml.
DIT_RANKS = [6, 7]
FAULT_KINDS = ["kill", "pause", "disconnect"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def compose_command():
    for argv in (["docker-compose"], ["docker", "compose"]):
        if shutil.which(argv[0]) and subprocess.run(argv + ["version"], capture_output=True).returncode == 0:
            return argv
    sys.exit("neither docker-compose nor `docker compose` is installed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """One compose project of compose.cpu.yml + compose.test.yml, as tests/containers brings it up."""

    def __init__(self, project, images):
        self.project = project
        self.port = free_port()
        self.workdir = tempfile.mkdtemp(prefix="x2v-chaos-")
        secret = Path(self.workdir) / "transfer_secret"
        secret.write_text(os.urandom(24).hex())
        secret.chmod(0o444)
        self.env = dict(os.environ, GATEWAY_PORT=str(self.port), TRANSFER_SECRET_FILE=str(secret), **images)
        self.env.pop("TOPOLOGY", None)
        self.env.pop("MODELS_DIR", None)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.argv = compose_command() + ["-p", project] + [a for f in COMPOSE_FILES for a in ("-f", str(f))]
        self.ids = {}

    def compose(self, *args, timeout=300):
        r = subprocess.run(self.argv + list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"compose {' '.join(args)}: {r.stderr[-3000:]}")
        return r.stdout

    def container(self, service):
        if service not in self.ids:
            cid = self.compose("ps", "-q", service).strip()
            if not cid:
                raise RuntimeError(f"no container for {service}")
            self.ids[service] = cid
        return self.ids[service]

    def network(self):
        return f"{self.project}_backend"

    def up(self):
        self.compose("up", "-d")

    def logs(self, tail=40):
        r = subprocess.run(self.argv + ["logs", "--no-color", "--tail", str(tail)], env=self.env,
                           capture_output=True, text=True)
        return r.stdout + r.stderr

    def down(self):
        # A container left paused by an interrupted fault would hold `down` up.
        for cid in self.ids.values():
            docker("unpause", cid)
        try:
            subprocess.run(self.argv + ["down", "-v", "--remove-orphans", "-t", "5"], env=self.env,
                           capture_output=True, timeout=300)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def docker(*args, timeout=60):
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode == 0, (r.stdout + r.stderr).strip()


def wait_serving(client, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            models = {m.id: m for m in client.models.list()}
            m = models.get(MODEL)
            if m is not None and sorted(m.model_extra["x2v"]["ranks"]["dit"]) == DIT_RANKS:
                return
        except openai.APIError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the gateway did not list {MODEL} with DiT ranks {DIT_RANKS} within {timeout} s")


class Faults(threading.Thread):
    """Applies a seeded schedule of faults, one at a time, each undone after its duration."""

    def __init__(self, stack, schedule, t0, stop):
        super().__init__(daemon=True)
        self.stack, self.schedule, self.t0, self.stop = stack, schedule, t0, stop
        self.done = []  # (start s, end s, kind, target, duration s, outcome)

    def run(self):
        for at, kind, target, duration in self.schedule:
            while time.monotonic() - self.t0 < at:
                if self.stop.wait(0.1):
                    return
            start = time.monotonic() - self.t0
            outcome = self.apply(kind, target, duration)
            self.done.append((start, time.monotonic() - self.t0, kind, target, duration, outcome))
            log(f"fault {kind} {target} {duration:.1f} s: {outcome}")

    def apply(self, kind, target, duration):
        try:
            cid = self.stack.container(target)
        except RuntimeError as e:
            return f"skipped: {e}"
        if kind == "kill":
            ok, out = docker("kill", cid)
            if not ok:
                return f"kill failed: {out[:120]}"
            time.sleep(duration)
            ok, out = docker("start", cid)
            return "killed, started" if ok else f"start failed: {out[:120]}"
        if kind == "pause":
            ok, out = docker("pause", cid)
            if not ok:
                return f"pause failed: {out[:120]}"
            time.sleep(duration)
            ok, out = docker("unpause", cid)
            return "paused, unpaused" if ok else f"unpause failed: {out[:120]}"
        if kind == "disconnect":
            net = self.stack.network()
            ok, out = docker("network", "disconnect", net, cid)
            if not ok:
                return f"disconnect failed: {out[:120]}"
            time.sleep(duration)
            ok, out = docker("network", "connect", "--alias", target, net, cid)
            return "disconnected, connected" if ok else f"connect failed: {out[:120]}"
        return "unknown fault"


def make_schedule(rng, span_s, every_s, targets, min_s, max_s):
    """Fault start times about every `every_s` seconds (±30 %) within `span_s`, starting after one
    interval; kind, target and duration drawn from the seeded generator."""
    out, at = [], every_s * rng.uniform(0.7, 1.3)
    while at < span_s:
        out.append((at, rng.choice(FAULT_KINDS), rng.choice(targets), rng.uniform(min_s, max_s)))
        at += every_s * rng.uniform(0.7, 1.3)
    return out


class Job:
    def __init__(self, index, submitted):
        self.index, self.submitted = index, submitted
        self.id = None
        self.state = None  # last (status, progress, stage, step)
        self.changed = submitted
        self.stall = 0.0
        self.end = None  # "completed" | "failed" | "lost" | "stuck" | "submit failed"
        self.ended_at = None
        self.error = None
        self.poll_errors = 0


def poll_jobs(client, jobs, lock, all_submitted, deadline_s, stop):
    """Polls every unfinished job until each has ended or passed its deadline."""
    while not stop.is_set():
        with lock:
            pending = [j for j in jobs if j.end is None]
        if all_submitted.is_set() and not pending:
            return
        for j in pending:
            now = time.monotonic()
            try:
                v = client.videos.retrieve(j.id)
            except openai.NotFoundError as e:
                j.end, j.ended_at, j.error = "lost", now, f"404: {e.message[:80]}"
                continue
            except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                    openai.APIStatusError) as e:
                j.poll_errors += 1
                v = None
            now = time.monotonic()
            if v is not None:
                x = (v.model_extra or {}).get("x2v") or {}
                state = (v.status, v.progress, x.get("stage"), x.get("step"))
                if state != j.state:
                    j.stall = max(j.stall, now - j.changed)
                    j.state, j.changed = state, now
                if v.status in ("completed", "failed"):
                    j.end, j.ended_at = v.status, now
                    if v.status == "failed":
                        err = v.error
                        j.error = f"{getattr(err, 'code', None)}: {getattr(err, 'message', None)}" if err else "no error given"
                    continue
            if now - j.submitted > deadline_s:
                j.stall = max(j.stall, now - j.changed)
                j.end, j.ended_at = "stuck", now
                j.error = f"last seen {j.state}"
        time.sleep(0.25)


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * len(v) + 0.5) - 1))]


def report(args, jobs, faults, t0, wall):
    counts = Counter(j.end for j in jobs)
    done = [j.ended_at - j.submitted for j in jobs if j.end == "completed"]
    longest = max(jobs, key=lambda j: j.stall, default=None)
    rows = [
        ("jobs submitted", f"{len(jobs)} ({args.rate} /s, {args.steps} steps, {args.size}, {args.seconds} s)"),
        ("completed", str(counts["completed"])),
        ("failed", str(counts["failed"])),
        ("submit failed", str(counts["submit failed"])),
        ("lost", str(counts["lost"])),
        (f"stuck (deadline {args.deadline_s:g} s)", str(counts["stuck"])),
        ("latency p50 / p99 (completed)", f"{pct(done, 50):.1f} s / {pct(done, 99):.1f} s"),
        ("latency max (completed)", f"{max(done):.1f} s" if done else "-"),
        ("longest stall", f"{longest.stall:.1f} s (job {longest.index})" if longest else "-"),
        ("faults injected", str(len(faults))),
        ("wall time", f"{wall:.0f} s"),
    ]
    w = max(len(a) for a, _ in rows)
    print()
    print(f"| {'what'.ljust(w)} | result |")
    print(f"|{'-' * (w + 2)}|---|")
    for a, b in rows:
        print(f"| {a.ljust(w)} | {b} |")
    errors = Counter(j.error for j in jobs if j.end in ("failed", "submit failed", "lost", "stuck"))
    if errors:
        print()
        print("| outcome | error | jobs |")
        print("|---|---|---|")
        by = {}
        for j in jobs:
            if j.end in ("failed", "submit failed", "lost", "stuck"):
                by.setdefault((j.end, j.error), []).append(j.index)
        for (end, err), idx in sorted(by.items(), key=lambda kv: -len(kv[1])):
            print(f"| {end} | {err} | {len(idx)} ({', '.join(map(str, idx[:10]))}{', ...' if len(idx) > 10 else ''}) |")
    if faults:
        print()
        print("| at (s) | until (s) | fault | target | outcome |")
        print("|---|---|---|---|---|")
        for start, end, kind, target, duration, outcome in faults:
            print(f"| {start:.1f} | {end:.1f} | {kind} {duration:.1f} s | {target} | {outcome} |")
    unexplained = [j for j in jobs if j.end == "failed" and (not j.error or j.error.startswith("None"))]
    return counts["lost"] == 0 and counts["stuck"] == 0 and not unexplained


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=200, help="video jobs to submit (default 200)")
    p.add_argument("--rate", type=float, default=0.5, help="jobs submitted per second (default 0.5)")
    p.add_argument("--deadline-s", type=float, default=180, help="a job not ended this long after its submission is stuck")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule and the job seeds")
    p.add_argument("--fault-every", type=float, default=10, help="mean seconds between faults; 0 for none")
    p.add_argument("--fault-min-s", type=float, default=2, help="shortest fault duration")
    p.add_argument("--fault-max-s", type=float, default=6, help="longest fault duration")
    p.add_argument("--targets", default=",".join(STAGES),
                   help=f"services faults hit, comma-separated (default {','.join(STAGES)}; redis, gateway may be added)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per job")
    p.add_argument("--size", default="256x256")
    p.add_argument("--seconds", default="1", help="video length: 1 s = 9 frames of the demo model")
    p.add_argument("--project", default=f"x2vchaos{os.getpid()}", help="compose project name")
    p.add_argument("--base-url", help="measure this running gateway (e.g. http://127.0.0.1:8000/v1): no compose, no faults")
    p.add_argument("--api-key", default=os.environ.get("X2V_API_KEY"), help="bearer key with --base-url")
    p.add_argument("--keep", action="store_true", help="leave the compose project up at the end")
    args = p.parse_args()

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so the project is always torn down.
    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    rng = random.Random(args.seed)
    stack = faults = None
    stop = threading.Event()
    ok = False
    try:
        if args.base_url:
            base_url, key = args.base_url, args.api_key or "none"
        else:
            images = {k: os.environ.get(k, v) for k, v in
                      {"X2V_IMAGE": "x2v:test", "X2V_GATEWAY_IMAGE": "x2v-gateway:test",
                       "X2V_REDIS_IMAGE": "x2v-redis:bookworm"}.items()}
            stack = Stack(args.project, images)
            log(f"compose project {stack.project} up ({images['X2V_IMAGE']}, {images['X2V_GATEWAY_IMAGE']}) on port {stack.port}")
            stack.up()
            base_url, key = stack.base_url, TEST_API_KEY
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)
        wait_serving(client)
        log("serving; warming both DiT ranks")
        for rank in DIT_RANKS:
            w = client.videos.create_and_poll(model=MODEL, prompt="warm up", size=args.size, seconds=args.seconds,
                                              poll_interval_ms=200,
                                              extra_body={"num_inference_steps": 2, "dit_engine_rank": rank})
            if w.status != "completed":
                raise RuntimeError(f"warm-up job on rank {rank}: {w.status} {w.error}")

        t0 = time.monotonic()
        span = args.jobs / args.rate
        targets = [t.strip() for t in args.targets.split(",") if t.strip()]
        schedule = [] if (args.base_url or args.fault_every <= 0) else make_schedule(
            rng, span, args.fault_every, targets, args.fault_min_s, args.fault_max_s)
        faults = Faults(stack, schedule, t0, stop) if schedule else None
        jobs, lock, all_submitted = [], threading.Lock(), threading.Event()
        poller = threading.Thread(target=poll_jobs, args=(client, jobs, lock, all_submitted, args.deadline_s, stop),
                                  daemon=True)
        poller.start()
        if faults:
            faults.start()
        log(f"submitting {args.jobs} jobs at {args.rate}/s; {len(schedule)} faults scheduled")
        for i in range(args.jobs):
            due = t0 + i / args.rate
            time.sleep(max(0.0, due - time.monotonic()))
            j = Job(i, time.monotonic())
            try:
                v = client.videos.create(model=MODEL, prompt=f"chaos soak {i}", size=args.size, seconds=args.seconds,
                                         extra_body={"num_inference_steps": args.steps, "seed": rng.randrange(1 << 31)})
                j.id = v.id
            except openai.APIError as e:
                j.end, j.ended_at = "submit failed", time.monotonic()
                j.error = f"{getattr(e, 'status_code', None) or type(e).__name__}: {str(e)[:100]}"
            with lock:
                jobs.append(j)
        all_submitted.set()
        log("all submitted; waiting for the jobs to end")
        if faults:
            faults.join()
        poller.join()
        wall = time.monotonic() - t0
        ok = report(args, jobs, faults.done if faults else [], t0, wall)
        print(f"\ncommand: {' '.join(sys.argv)}")
    except KeyboardInterrupt:
        log("interrupted")
    except Exception as e:
        log(f"error: {e}")
        if stack:
            print(stack.logs(), file=sys.stderr)
    finally:
        stop.set()
        if faults is not None and faults.is_alive():
            # Let a fault under way be undone before the project goes.
            faults.join(timeout=args.fault_max_s + 30)
        if stack and not args.keep:
            log(f"compose project {stack.project} down -v")
            stack.down()
        elif stack:
            log(f"left up: {stack.base_url} (key {TEST_API_KEY}); "
                f"`TRANSFER_SECRET_FILE={stack.env['TRANSFER_SECRET_FILE']} {' '.join(stack.argv)} down -v` "
                f"removes it (then {stack.workdir})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
