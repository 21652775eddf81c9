#!/usr/bin/env python3
"""Where a booting Linux guest spends its time: samples every vCPU's RIP through irqvm's control API
(GET /api/v1/vcpus, docs/operations.md) and names the kernel function of each sample.

Usage: linux-profile.py --sock API_SOCK --symbols FILE [--interval SECONDS] [--log SERIAL_LOG]

FILE is "ADDRESS TYPE NAME" per line, as System.map or `kallsyms-finder vmlinux` (PyPI package
vmlinux-to-elf; Debian's System.map is a placeholder without the -dbg package) print; pass
`nokaslr` to the guest so that the addresses match. Each sample prints the host time, the vCPU,
its thread state, RIP, function+offset and, with --log, the last line of the serial log. When the
VM goes away (or on Ctrl-C) a histogram of the functions sampled is printed, most frequent first.
"""
import argparse
import bisect
import collections
import http.client
import json
import socket
import sys
import time


class UnixConnection(http.client.HTTPConnection):
    """HTTP/1.1 over the API's Unix socket."""

    def __init__(self, path):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def load_symbols(path):
    """Text and data symbols sorted by address: (addresses, names)."""
    pairs = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or parts[1] in ("A", "a"):
                continue
            try:
                pairs.append((int(parts[0], 16), parts[2]))
            except ValueError:
                continue
    pairs.sort()
    return [a for a, _ in pairs], [n for _, n in pairs]


def name_of(rip, addrs, names):
    i = bisect.bisect_right(addrs, rip) - 1
    if i < 0:
        return "?"
    return f"{names[i]}+{rip - addrs[i]:#x}"


def last_line(path):
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
            return lines[-1].strip() if lines else ""
    except OSError:
        return ""


def sample(sock):
    conn = UnixConnection(sock)
    try:
        conn.request("GET", "/api/v1/vcpus")
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sock", required=True)
    p.add_argument("--symbols", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--log")
    args = p.parse_args()
    addrs, names = load_symbols(args.symbols)
    counts = collections.Counter()
    start = time.monotonic()
    try:
        while True:
            try:
                vcpus = sample(args.sock)
            except (OSError, http.client.HTTPException, json.JSONDecodeError):
                if counts:
                    break
                time.sleep(args.interval)
                continue
            now = time.monotonic() - start
            tail = last_line(args.log)
            for v in vcpus:
                fn = name_of(v["rip"], addrs, names)
                counts[fn.split("+")[0] if v["thread"] == "running" else v["thread"]] += 1
                print(f"{now:8.1f} vcpu{v['index']} {v['thread']:8} {v['rip']:#018x} {fn}  | {tail[:90]}",
                      flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    total = sum(counts.values())
    print(f"---- {total} samples")
    for fn, n in counts.most_common(40):
        print(f"{n:6} {100.0 * n / total:5.1f}% {fn}")


if __name__ == "__main__":
    sys.exit(main())
