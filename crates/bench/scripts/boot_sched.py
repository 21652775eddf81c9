#!/usr/bin/env python3
"""Where the first AP's `boot_wake` goes at 2 vCPUs: the guest's figure beside the host scheduler's view
(docs/benchmarks.md, "The 2-vCPU `boot_wake`").

    boot_sched.py ROUNDS IRQVM [PEER,...] [OUTDIR]

Runs `IRQVM run --kernel <guests>/bench_boot.elf --cpus 2 --irqchip MODE` (peers interleaved run by run,
default `user,kernel`; a PEER is a MODE of IRQVM or NAME=BINARY:MODE, another build's `irqvm`) under `perf record -a` of `sched:sched_wakeup` and `sched:sched_switch`, and prints
per run: the guest's `boot_wake` (µs, the AP's only sample), and from the scheduler's events the last
wake-up of the AP's thread (`vcpu1`) before its first stretch of more than 150 µs on a CPU (the start-up
itself): how long the woken thread waited for a CPU, whether it was queued on the waker's CPU, and what the
other CPU was running then (name/kernel priority: 120 is nice 0, 139 nice 19). The VM runs under `nice -n 19`,
as everything here does, and its AP thread is told from other VMs' `vcpu1` threads by that priority (139).
Needs root (perf -a).
The guests come from IRQVM_GUESTS (default: the release build's guests of this worktree); cycles are
converted at TSC_GHZ (default: /proc/cpuinfo's "cpu MHz", the TSC rate on the kvm_pvm hosts).
"""
import glob
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from boot_ab import TSC_GHZ  # noqa: E402 (the script beside this one)

LONG_RUN_S = 150e-6
EVENT = re.compile(r"\s*(.+?)\s+(-?\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s+(.*)")


def tsc_ghz():
    """The TSC rate, as boot_ab.py finds it (TSC_GHZ or /proc/cpuinfo)."""
    return TSC_GHZ


def guest():
    where = os.environ.get("IRQVM_GUESTS") or glob.glob("target/release/build/irqvm-*/out/guests")[0]
    return os.path.join(where, "bench_boot.elf")


def run_one(irqvm, mode, data):
    """One traced run; returns the guest's boot_wake in µs (None if it printed none)."""
    out = subprocess.run(
        ["perf", "record", "-q", "-o", data, "-a", "-e", "sched:sched_wakeup,sched:sched_switch", "--",
         "nice", "-n", "19", irqvm, "run", "--kernel", guest(), "--cpus", "2", "--irqchip", mode, "--no-seccomp", "--timeout", "60"],
        capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"SAMPLES: name=boot_wake (\S+)", out)
    return int(m.group(1), 16) / tsc_ghz() / 1000 if m else None


def ap_tid(lines):
    """The thread id of this VM's AP thread: `vcpu1` at nice 19 (other VMs' run at nice 0 here)."""
    for line in lines:
        m = re.search(r"comm=vcpu1 pid=(\d+) prio=139", line)
        if m:
            return m.group(1)
    return None


def ap_wait(data):
    """(µs from the AP thread's wake-up to its start-up on a CPU, on the waker's CPU?, other CPU's task)."""
    lines = subprocess.run(["perf", "script", "-i", data], capture_output=True, text=True).stdout.splitlines()
    tid = ap_tid(lines)
    running, wake, start = {}, None, None
    for line in lines:
        m = EVENT.match(line)
        if not m:
            continue
        _, _, cpu, ts, event, rest = m.groups()
        cpu, ts = int(cpu), float(ts)
        if event == "sched:sched_wakeup" and f"comm=vcpu1 pid={tid} " in rest:
            target = int(re.search(r"target_cpu=(\d+)", rest).group(1))
            wake = (ts, cpu == target, running.get(1 - target, "?"))
        elif event == "sched:sched_switch":
            nxt = re.search(r"next_comm=(.+?) next_pid=(-?\d+) next_prio=(\d+)", rest)
            if f"prev_comm=vcpu1 prev_pid={tid} " in rest and start and start[1] == cpu:
                if ts - start[0] > LONG_RUN_S and wake:
                    return round((start[0] - wake[0]) * 1e6), wake[1], wake[2]
                start = None
            running[cpu] = f"{nxt.group(1)}/{nxt.group(3)}"
            if nxt.group(1) == "vcpu1" and nxt.group(2) == tid:
                start = (ts, cpu)
    return None, None, None


def peer(spec, irqvm):
    """(name, binary, mode) of a PEER argument: MODE (of IRQVM) or NAME=BINARY:MODE."""
    if "=" not in spec:
        return spec, irqvm, spec
    name, rest = spec.split("=", 1)
    binary, mode = rest.rsplit(":", 1)
    return name, binary, mode


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    rounds, irqvm = int(sys.argv[1]), sys.argv[2]
    peers = [peer(p, irqvm) for p in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["user", "kernel"])]
    outdir = sys.argv[4] if len(sys.argv) > 4 else "."
    wakes = {name: [] for name, _, _ in peers}
    for r in range(rounds):
        for name, binary, mode in peers:
            data = os.path.join(outdir, f"{name}-{r}.data")
            wake = run_one(binary, mode, data)
            waited, same_cpu, other = ap_wait(data)
            where = "?" if same_cpu is None else ("waker's CPU" if same_cpu else "other CPU")
            print(f"{name} {r}: boot_wake {wake and round(wake)} µs | AP thread waited {waited} µs for a CPU, "
                  f"queued on the {where}; other CPU ran {other} | load {open('/proc/loadavg').read().split()[0]}",
                  flush=True)
            if wake is not None:
                wakes[name].append(wake)
    for name, xs in wakes.items():
        if xs:
            print(f"{name}: boot_wake median {round(statistics.median(xs))} µs [{round(min(xs))}-{round(max(xs))}], "
                  f"{sum(x > 1000 for x in xs)}/{len(xs)} runs over 1 ms")


if __name__ == "__main__":
    main()
