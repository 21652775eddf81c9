#!/usr/bin/env python3
"""A/B of AP bring-up between irqvm builds (docs/benchmarks.md, "The INIT taken with the SIPI").

    boot_ab.py run COUNTS ROUNDS NAME=BINARY:MODE[,NAME=BINARY:MODE...] OUT.json
    boot_ab.py summary OUT.json

`run` starts `BINARY --vm-child <guests>/bench_boot.elf --child-cpus N --child-irqchip MODE` (BINARY: a
copy of target/release/irqvm-bench of each build; MODE `qemu-kvm` runs BINARY, a qemu-system-x86_64, with
the bench's QEMU/KVM options instead) for every count, round and peer in turn, so that the
host's load falls on every peer alike, and keeps the `SAMPLES:` lines of the five `boot` workloads
(guest TSC cycles, converted at TSC_GHZ: the environment's, else the host's "cpu MHz", which is
its TSC rate on the kvm_pvm hosts; each run's log line prints the rate). `summary` prints, per
count and peer, p10 and median per phase in µs per AP over all APs of all rounds, and the median
[min-max] of the rounds' bring-up times in ms.
The guests come from IRQVM_GUESTS (default: the release build's guests of this worktree).
"""
import glob
import json
import os
import re
import statistics
import subprocess
import sys

def host_tsc_ghz():
    """The TSC rate the guests' cycles are converted at (see the module's text)."""
    if os.environ.get("TSC_GHZ"):
        return float(os.environ["TSC_GHZ"])
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    sys.exit("no TSC rate: set TSC_GHZ")


TSC_GHZ = host_tsc_ghz()
PHASES = ["boot_send", "boot_wake", "boot_ap", "boot_notice"]


def guest():
    where = os.environ.get("IRQVM_GUESTS") or glob.glob("target/release/build/irqvm-*/out/guests")[0]
    return os.path.join(where, "bench_boot.elf")


def command(binary, mode, cpus):
    """irqvm-bench's child run, or with MODE `qemu-kvm` QEMU/KVM as irqvm-bench runs it (runner.rs)."""
    if mode == "qemu-kvm":
        return [binary, "-machine", "pc", "-accel", "kvm", "-cpu", "max,-arch-capabilities",
                "-smp", str(cpus), "-m", "128", "-kernel", guest(), "-append", "",
                "-display", "none", "-serial", "stdio", "-monitor", "none", "-nic", "none",
                "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-device", "pc-testdev"]
    return [binary, "--vm-child", guest(), "--child-cpus", str(cpus), "--child-irqchip", mode,
            "--child-timeout", "120"]


def run_one(binary, mode, cpus):
    out = subprocess.run(command(binary, mode, cpus), capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL).stdout
    samples = {}
    for line in out.splitlines():
        m = re.match(r"SAMPLES: name=(\S+) (.*)", line)
        if m:
            samples[m.group(1)] = [int(x, 16) / TSC_GHZ / 1000 for x in m.group(2).split()]
    return samples


def run(counts, rounds, peers, out):
    data = {}
    for cpus in counts:
        for r in range(rounds):
            for name, spec in peers:
                binary, mode = spec.split(":")
                for phase, xs in run_one(binary, mode, cpus).items():
                    data.setdefault(f"{name}/{cpus}/{phase}", []).append(xs)
                print(cpus, r, name, "load", open("/proc/loadavg").read().split()[:3], "TSC GHz", TSC_GHZ,
                      flush=True)
            with open(out, "w") as f:
                json.dump(data, f)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(path):
    data = json.load(open(path))
    keys = sorted({(int(k.split("/")[1]), k.split("/")[0]) for k in data})
    print("| vCPUs | peer | p10 send / wake / ap / notice (sum) | median send / wake / ap / notice | bring-up ms |")
    print("|---|---|---|---|---|")
    for cpus, name in keys:
        flat = {p: [x for r in data.get(f"{name}/{cpus}/{p}", []) for x in r] for p in PHASES}
        if not all(flat.values()):
            continue
        p10 = [round(pct(flat[p], 0.1)) for p in PHASES]
        med = [round(statistics.median(flat[p])) for p in PHASES]
        total = [max(r) / 1000 for r in data[f"{name}/{cpus}/boot"] if r]
        print(f"| {cpus} | {name} | {' / '.join(map(str, p10))} ({sum(p10)}) | {' / '.join(map(str, med))} | "
              f"{statistics.median(total):.4g} [{min(total):.4g}-{max(total):.4g}] |")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "run":
        peers = [p.split("=", 1) for p in sys.argv[4].split(",")]
        run([int(c) for c in sys.argv[2].split(",")], int(sys.argv[3]), peers, sys.argv[5])
    elif len(sys.argv) == 3 and sys.argv[1] == "summary":
        summary(sys.argv[2])
    else:
        sys.exit(__doc__)
