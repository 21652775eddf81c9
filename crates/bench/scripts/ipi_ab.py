#!/usr/bin/env python3
"""A/B of interrupt workloads between irqvm builds and modes, run by run (docs/benchmarks.md, issue 14).

    ipi_ab.py run GUEST CPUS N ROUNDS NAME=BINARY:MODE[,NAME=BINARY:MODE...] OUT.json
    ipi_ab.py summary OUT.json [WORKLOAD...]

`run` starts `BINARY --vm-child <guests>/GUEST.elf --child-cpus CPUS --child-irqchip MODE
--child-cmdline n=N` (BINARY: a copy of target/release/irqvm-bench of each build) for every round and
peer in turn, so that the host's load falls on every peer alike, and keeps per workload the run's
median latency (guest TSC cycles at TSC_GHZ, default /proc/cpuinfo's `cpu MHz`, in µs), the interrupts it counted, the VMM's counters
over the workload (`COUNTERS: begin|end`, user mode only; per counted interrupt) and the load average.
`summary` prints, per workload and peer, the median [min-max] of the runs' medians, the load range and
the counters per interrupt (medians over the runs). The guests come from IRQVM_GUESTS (default: the
release build's guests of this worktree).
"""
import glob
import json
import os
import re
import statistics
import subprocess
import sys

def cpu_ghz():
    """The host's TSC rate where /proc/cpuinfo's `cpu MHz` is it (this host: 2.596 GHz, as
    `irqvm-bench` measures it); TSC_GHZ overrides."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return 2.445


TSC_GHZ = float(os.environ.get("TSC_GHZ") or cpu_ghz())
COUNTERS = ["kvm_runs", "mmio_exits", "hlt_exits", "eintr_returns", "single_steps", "return_runs", "stretch_runs", "finished_returns", "kept_breakpoints", "post_kicks",
            "post_wakes", "doorbell_wakes", "doorbell_waits", "halt_sleeps", "halt_polls_ok",
            "interrupts_injected", "wake_yields"]


def guest(name):
    where = os.environ.get("IRQVM_GUESTS") or glob.glob("target/release/build/irqvm-*/out/guests")[0]
    return os.path.join(where, name + ".elf")


def counters(text):
    out = {}
    for kv in text.split():
        k, _, v = kv.partition("=")
        if v.isdigit() and not k.startswith(("inject_to_eoi", "post_to_inject", "injected_vector")):
            out[k] = int(v)
    return out


def parse(out):
    res, marks = {}, {}
    for line in out.splitlines():
        m = re.match(r"SAMPLES: name=(\S+) ?(.*)", line)
        if m:
            xs = [int(x, 16) / TSC_GHZ / 1000 for x in m.group(2).split()]
            res.setdefault(m.group(1), {})["median"] = statistics.median(xs) if xs else None
        m = re.match(r"BENCH: name=(\S+) sent=(\d+) counted=(\d+)", line)
        if m:
            res.setdefault(m.group(1), {})["counted"] = int(m.group(3))
        m = re.match(r"COUNTERS: (begin|end) (\S+) (.*)", line)
        if m:
            marks.setdefault((m.group(1), m.group(2)), {}).update(counters(m.group(3)))
    for name, r in res.items():
        b, e = marks.get(("begin", name)), marks.get(("end", name))
        if b and e and r.get("counted"):
            r["per_irq"] = {k: (e.get(k, 0) - b.get(k, 0)) / r["counted"] for k in COUNTERS if k in e}
    return res


def run_one(binary, mode, guest_name, cpus, n):
    out = subprocess.run(
        [binary, "--vm-child", guest(guest_name), "--child-cpus", str(cpus), "--child-irqchip", mode,
         "--child-cmdline", f"n={n}", "--child-timeout", "300"],
        capture_output=True, text=True, timeout=600).stdout
    return parse(out)


def run(guest_name, cpus, n, rounds, peers, out):
    data = []
    for r in range(rounds):
        for name, spec in peers:
            binary, mode = spec.split(":")
            load = float(open("/proc/loadavg").read().split()[0])
            res = run_one(binary, mode, guest_name, cpus, n)
            data.append({"round": r, "peer": name, "load": load, "results": res})
            brief = {w: round(v["median"], 1) for w, v in res.items() if v.get("median")}
            print(r, name, "load", load, brief, flush=True)
            with open(out, "w") as f:
                json.dump(data, f)


def summary(path, only):
    data = json.load(open(path))
    peers = list(dict.fromkeys(d["peer"] for d in data))
    works = list(dict.fromkeys(w for d in data for w in d["results"]))
    print("| workload | peer | runs | median µs [min-max of run medians] | load | per interrupt (medians) |")
    print("|---|---|---|---|---|---|")
    for w in works:
        if only and w not in only:
            continue
        for p in peers:
            runs = [d for d in data if d["peer"] == p and d["results"].get(w, {}).get("median")]
            if not runs:
                continue
            meds = [d["results"][w]["median"] for d in runs]
            loads = [d["load"] for d in runs]
            per = [d["results"][w].get("per_irq") for d in runs if d["results"][w].get("per_irq")]
            cost = ", ".join(f"{k} {statistics.median(x[k] for x in per):.2f}"
                             for k in COUNTERS if per and all(k in x for x in per))
            print(f"| {w} | {p} | {len(runs)} | {statistics.median(meds):.4g} [{min(meds):.4g}-{max(meds):.4g}] | "
                  f"{min(loads):.1f}-{max(loads):.1f} | {cost} |")


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "run":
        peers = [p.split("=", 1) for p in sys.argv[6].split(",")]
        run(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), peers, sys.argv[7])
    elif len(sys.argv) >= 3 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
