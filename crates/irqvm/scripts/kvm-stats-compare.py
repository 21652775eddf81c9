#!/usr/bin/env python3
"""Compares files written by `irqvm run --kvm-stats FILE` (docs/operations.md): per-second rates of
every statistic, one column per file, over the whole run or a window of each.

    kvm-stats-compare.py A.txt[@FROM-TO] B.txt[@FROM-TO] ...

FROM-TO (seconds of the file's `t=`) takes the difference between the readings nearest those times,
e.g. the stress phase of a Linux boot. `instant`/`peak` statistics (vm.pages_*, max_*, mmu_unsync)
are shown as their largest value in the window, not a rate. The last column is the ratio of the first two files."""
import sys

LEVELS = ("vm.pages_", "vm.max_", "vm.mmu_unsync", "vcpu.guest_mode", "vcpu.blocking")


def blocks(path):
    out, cur = [], {}
    for line in open(path):
        line = line.strip()
        if not line:
            if cur:
                out.append(cur)
            cur = {}
            continue
        name, _, value = line.partition("=")
        cur[name] = float(value)
    if cur:
        out.append(cur)
    return out


def window(spec):
    path, _, span = spec.partition("@")
    bs = blocks(path)
    if not span:
        first, last = {k: 0.0 for k in bs[-1]}, bs[-1]
        bs = [first] + bs
    else:
        lo, hi = (float(x) for x in span.split("-"))
        first = min(bs, key=lambda b: abs(b["t"] - lo))
        last = min(bs, key=lambda b: abs(b["t"] - hi))
    dt = last["t"] - first["t"]
    inside = [b for b in bs if first["t"] <= b["t"] <= last["t"]] or [last]
    rates = {}
    for name, value in last.items():
        if name in ("t", "end"):
            continue
        if name.startswith(LEVELS):
            rates[name] = ("level", max(b.get(name, 0.0) for b in inside))
        else:
            rates[name] = ("rate", (value - first.get(name, 0.0)) / dt)
    return spec, dt, rates


def main():
    runs = [window(s) for s in sys.argv[1:]]
    names = sorted({n for _, _, r in runs for n in r})
    print("%-34s" % "stat (per s)" + "".join("%16s" % ("%.0f s" % dt) for _, dt, _ in runs) + "   ratio 1/2")
    for name in names:
        vals = [r.get(name, ("rate", 0.0)) for _, _, r in runs]
        cells = "".join("%16.1f" % v for _, v in vals)
        ratio = ""
        if len(vals) >= 2 and vals[1][1]:
            ratio = "%10.3g" % (vals[0][1] / vals[1][1])
        elif len(vals) >= 2 and vals[0][1]:
            ratio = "%10s" % "inf"
        kind = " (level)" if vals[0][0] == "level" else ""
        print("%-34s%s%s%s" % (name, cells, ratio, kind))
    for i, (spec, _, _) in enumerate(runs):
        print("column %d: %s" % (i + 1, spec))


main()
