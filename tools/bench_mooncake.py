#!/usr/bin/env python3
"""Mooncake Transfer Engine baseline for `x2v-transfer-bench`: TCP, P2PHANDSHAKE, two processes on
127.0.0.1, `transfer_sync_write` of each size into a registered buffer of the target process.

Prints one JSON object per size on stdout: {"size": bytes, "gbps": [run, ...], "verified": bool}.
The first write of each size (handshake, first-touch page faults) is a warm-up and not reported.
The target hashes the bytes of the last write and the initiator checks them.

Usage: bench_mooncake.py --sizes 1048576,67108864 --runs 5
Needs: pip install mooncake-transfer-engine-non-cuda; apt-get install libibverbs1 libnuma1 libcurl4.
"""
import argparse
import ctypes
import hashlib
import json
import mmap
import os
import subprocess
import sys
import time


def engine():
    from mooncake.engine import TransferEngine

    eng = TransferEngine()
    if eng.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit("mooncake: initialize failed")
    return eng


def buffer(eng, size):
    buf = mmap.mmap(-1, size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if eng.register_memory(addr, size) != 0:
        raise SystemExit("mooncake: register_memory failed")
    return buf, addr


def target(size):
    eng = engine()
    buf, addr = buffer(eng, size)
    print(json.dumps({"session": f"127.0.0.1:{eng.get_rpc_port()}", "addr": addr}), flush=True)
    for line in sys.stdin:
        n = int(line)
        print(hashlib.blake2b(buf[:n], digest_size=16).hexdigest(), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--target", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.target:
        return target(args.target)
    sizes = [int(s) for s in args.sizes.split(",")]
    biggest = max(sizes)
    child = subprocess.Popen(
        [sys.executable, __file__, "--sizes", args.sizes, "--target", str(biggest)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    info = json.loads(child.stdout.readline())
    eng = engine()
    buf, addr = buffer(eng, biggest)
    pattern = os.urandom(1 << 20)
    for off in range(0, biggest, 1 << 20):
        buf[off:off + (1 << 20)] = pattern[: min(1 << 20, biggest - off)]
    for size in sizes:
        runs = []
        for i in range(args.runs + 1):
            t = time.perf_counter()
            if eng.transfer_sync_write(info["session"], addr, info["addr"], size) != 0:
                raise SystemExit(f"mooncake: transfer_sync_write of {size} bytes failed")
            if i > 0:
                runs.append(size / (time.perf_counter() - t) / 1e9)
        child.stdin.write(f"{size}\n")
        child.stdin.flush()
        verified = child.stdout.readline().strip() == hashlib.blake2b(buf[:size], digest_size=16).hexdigest()
        print(json.dumps({"size": size, "gbps": runs, "verified": verified}), flush=True)
    child.stdin.close()
    child.wait()


if __name__ == "__main__":
    main()
