#!/usr/bin/env python3
"""Where a vCPU thread's time goes, from the host's ftrace (docs/benchmarks.md §19).

    vcpu_syscalls.py record THREAD_NAME OUT.txt -- COMMAND...   (root; ftrace at /sys/kernel/tracing)
    vcpu_syscalls.py profile TRACE.txt                          per ioctl: count, median, p10, p90, total µs;
                                                                KVM_RUN split by the exit it ended with
    vcpu_syscalls.py sequence TRACE.txt FIRST COUNT             the calls in order: NAME(µs)[->EXIT]

`record` traces `raw_syscalls` of the threads named THREAD_NAME (irqvm names them vcpu0, vcpu1, ...) and
`kvm:kvm_userspace_exit` while COMMAND runs, e.g.
    vcpu_syscalls.py record vcpu0 /tmp/t.txt -- target/release/irqvm-bench --vm-child ... --child-irqchip user
"""
import collections
import re
import subprocess
import sys

TRACING = "/sys/kernel/tracing"
IOCTLS = {0xAE80: "RUN", 0x8080AEA1: "GET_DEBUGREGS", 0x4048AE9B: "SET_GUEST_DEBUG", 0x8090AE81: "GET_REGS",
          0x4090AE82: "SET_REGS", 0x8138AE83: "GET_SREGS", 0x4138AE84: "SET_SREGS", 0x8040AE9F: "GET_VCPU_EVENTS",
          0x4040AEA0: "SET_VCPU_EVENTS", 0x4004AE86: "INTERRUPT", 0xC018AE85: "TRANSLATE", 0xAE9A: "NMI"}
LINE = re.compile(r"\s*(\S+)\s+\[(\d+)\].*?([\d.]+): (sys_enter|sys_exit|kvm_userspace_exit): (.*)")


def write(path, value):
    with open(f"{TRACING}/{path}", "w") as f:
        f.write(value)


def record(thread, out, command):
    write("tracing_on", "0")
    write("set_event", "")
    write("buffer_size_kb", "262144")
    flt = f'comm == "{thread}"'
    write("events/raw_syscalls/filter", flt)
    write("events/kvm/kvm_userspace_exit/filter", flt)
    write("events/raw_syscalls/enable", "1")
    write("events/kvm/kvm_userspace_exit/enable", "1")
    write("trace", "")
    write("tracing_on", "1")
    try:
        status = subprocess.call(command)
    finally:
        write("tracing_on", "0")
        with open(f"{TRACING}/trace") as src, open(out, "w") as dst:
            dst.write(src.read())
        write("set_event", "")
        write("events/raw_syscalls/filter", "0")
        write("events/kvm/kvm_userspace_exit/filter", "0")
    return status


def calls(path):
    """(name, µs, exit reason or None) for every completed syscall, in order."""
    name, start, reason = None, 0.0, None
    for line in open(path):
        m = LINE.match(line)
        if not m:
            continue
        t, ev, rest = float(m.group(3)) * 1e6, m.group(4), m.group(5)
        if ev == "sys_enter":
            nr = int(re.match(r"NR (\d+)", rest).group(1))
            if nr == 16:
                req = int(rest.split("(")[1].split(",")[1].strip(), 16)
                name = IOCTLS.get(req, hex(req))
            else:
                name = f"syscall{nr}"
            start, reason = t, None
        elif ev == "kvm_userspace_exit":
            m2 = re.search(r"reason (\S+)", rest)
            reason = m2.group(1) if m2 else rest.strip()
        elif name is not None:
            yield name, t - start, reason
            name = None


def stats(xs):
    xs = sorted(xs)
    n = len(xs)
    return f"n={n} median={xs[n // 2]:.1f} p10={xs[n // 10]:.1f} p90={xs[9 * n // 10]:.1f} total={sum(xs):.0f}"


def profile(path):
    by_name, by_exit = collections.defaultdict(list), collections.defaultdict(list)
    for name, us, reason in calls(path):
        by_name[name].append(us)
        if name == "RUN":
            by_exit[reason].append(us)
    for name, xs in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:18} {stats(xs)}")
    print("KVM_RUN by the exit it ended with:")
    for reason, xs in sorted(by_exit.items(), key=lambda kv: -sum(kv[1])):
        print(f"   {str(reason):24} {stats(xs)}")


def sequence(path, first, count):
    out = [f"{n}({us:.0f})" + (f"->{r.replace('KVM_EXIT_', '')}" if r else "")
           for n, us, r in calls(path)]
    print(" ".join(out[first:first + count]))


if __name__ == "__main__":
    a = sys.argv
    if len(a) >= 6 and a[1] == "record" and a[4] == "--":
        sys.exit(record(a[2], a[3], a[5:]))
    elif len(a) == 3 and a[1] == "profile":
        profile(a[2])
    elif len(a) == 5 and a[1] == "sequence":
        sequence(a[2], int(a[3]), int(a[4]))
    else:
        sys.exit(__doc__)
