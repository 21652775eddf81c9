#!/usr/bin/env bash
# Boots Debian's unmodified kernel on irqvm with a test initramfs, and reports the init script's
# checks (linux-boot/init: CPUs online, IPIs and local timer per CPU, the serial interrupt on
# the IOAPIC, a CPU offlined and onlined again). Not part of ./test.sh: Linux runs at roughly
# 0.5 M instructions per second under this host's emulator, so one boot takes minutes. CI (.ci/run)
# runs it on 1 vCPU in `user` mode (.ci/run).
#
# Usage: linux-boot.sh [--cpus N] [--irqchip user|split|kernel] [--format vmlinux|bzimage]
#                      [--memory SIZE] [--timeout SECONDS] [--irqvm PATH] [--append ARGS]
#                      [--api-sock PATH] [--exact on|off] [--tls-probe] [--cores]
#                      [--stress SECONDS] [--init32 SECONDS [--init32-int80]] [--syscall-watch on|off]
#                      [--kvm-stats FILE] [--tsc-deadline on|off]
# --append adds kernel arguments; --api-sock serves irqvm's control API, for linux-profile.sh.
# --tsc-deadline off boots with lapic=notscdeadline (the default on 2 or more vCPUs): with the
# TSC-deadline timer, a CPU whose first tick after the switch to kvm-clock comes late can stay in
# Linux's tick catch-up loop forever under this host's emulator (docs/benchmarks.md, "The tick
# livelock, found").
# Needs: apt-get install -y linux-image-cloud-amd64 busybox-static lz4 gcc cpio
# Exit status: 0 if the guest ended through isa-debug-exit with every check passed, 1 otherwise.
# Time budget: --timeout (default 2700 s) per boot; on a quiet AMD kvm_pvm host 1 vCPU took 604 s,
# 2 vCPUs 889 s (`kernel`), 4 vCPUs 937 s (`user`); on the Intel one of 2026-12-04 166-188 s, 166-203 s
# and 222-352 s; under load several times that (docs/benchmarks.md).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "linux-boot: $*" >&2; exit 1; }

cpus=1 irqchip=user format=vmlinux timeout=2700 irqvm= memory=128M append= api= exact= tls_probe= cores= stress= init32= init32_flags= syscall_watch= kvm_stats= tsc_deadline=
while [ $# -gt 0 ]; do
	case $1 in
	--cpus) cpus=$2; shift 2 ;;
	--irqchip) irqchip=$2; shift 2 ;;
	--format) format=$2; shift 2 ;;
	--timeout) timeout=$2; shift 2 ;;
	--irqvm) irqvm=$2; shift 2 ;;
	--memory) memory=$2; shift 2 ;;
	--append) append=$2; shift 2 ;;
	--api-sock) api=$2; shift 2 ;;
	--exact) exact=$2; shift 2 ;;
	--tls-probe) tls_probe=1; shift ;;
	--cores) cores=1; shift ;;
	--stress) stress=$2; shift 2 ;;
	--init32) init32=$2; shift 2 ;;
	--init32-int80) init32_flags=-DINIT32_INT80; shift ;;
	--syscall-watch) syscall_watch=$2; shift 2 ;;
	--kvm-stats) kvm_stats=$2; shift 2 ;;
	--tsc-deadline) tsc_deadline=$2; shift 2 ;;
	*) die "unknown argument $1" ;;
	esac
done
case $tsc_deadline in
'') if [ "$cpus" -gt 1 ]; then tsc_deadline=off; else tsc_deadline=on; fi ;;
on | off) ;;
*) die "--tsc-deadline takes on or off, not $tsc_deadline" ;;
esac

bzimage=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -1)
[ -n "$bzimage" ] || die "no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64"
[ -x /bin/busybox ] && file -L /bin/busybox | grep -q 'statically linked' ||
	die "/bin/busybox is not static: apt-get install busybox-static"
if [ -z "$irqvm" ]; then
	(cd "$here/.." && cargo build --release --quiet --bin irqvm)
	irqvm=$(cd "$here/../../.." && pwd)/target/release/irqvm
fi

work=${LINUX_BOOT_WORK:-/tmp/irqvm-linux-boot}
mkdir -p "$work"
kernel=$bzimage
if [ "$format" = vmlinux ]; then
	kernel=$work/vmlinux
	[ "$kernel" -nt "$bzimage" ] || "$here/extract-vmlinux.sh" "$bzimage" "$kernel"
fi

# The initramfs: busybox, /init, the isa-debug-exit helper, and a console node (the init
# script also mounts devtmpfs, in case mknod is not allowed here).
root=$work/root
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys}
cp /bin/busybox "$root/bin/busybox"
cp "$here/linux-boot/init" "$root/init"
gcc -static -O2 -o "$root/bin/irqvm-exit" "$here/linux-boot/irqvm-exit.c"
# --tls-probe: /bin/tlsprobe runs first as PID 1 (rdinit=), execs fresh processes that check their TLS
# the way static glibc sets it up (docs/benchmarks.md, "The FS-base fault: two suspects cleared"), then
# execs /init.
if [ -n "$tls_probe" ]; then
	gcc -static -nostdlib -O2 -fno-builtin -fno-tree-loop-distribute-patterns -fno-stack-protector \
		-o "$root/bin/tlsprobe" "$here/linux-boot/tlsprobe.c"
	gcc -static -O2 -o "$root/bin/tlsglibc" "$here/linux-boot/tlsglibc.c"
	append="$append rdinit=/bin/tlsprobe print-fatal-signals=1"
fi
# --cores: processes that die dump core in the initramfs, and init prints each core's TLS block
# (scripts/linux-boot/coreread.c) before its DONE line.
if [ -n "$cores" ]; then
	gcc -static -O2 -o "$root/bin/coreread" "$here/linux-boot/coreread.c"
	mkdir -p "$root/tmp"
	append="$append irqvm.cores=1 print-fatal-signals=1"
fi
# --stress SECONDS: before its checks, init runs /bin/imageprobe (scripts/linux-boot/imageprobe.c) in four
# unpinned loops for SECONDS, each exec'd process checking that its own image reads back as the file holds
# it, then four shell loops of busybox re-executing itself, the way the processes that died did.
if [ -n "$stress" ]; then
	gcc -static -O2 -o "$root/bin/imageprobe" "$here/linux-boot/imageprobe.c"
	append="$append irqvm.stress=$stress print-fatal-signals=1"
fi
# --init32 SECONDS: the initramfs holds only scripts/linux-boot/init32.c as /init, a 32-bit program with
# no C library that makes its system calls with compatibility-mode SYSCALL (which this host does in full):
# no 64-bit user process ever runs, so the boot can go with --syscall-watch off (docs/kvm-facts.md,
# "User-mode reads through a page the guest does not map, on 2 vCPUs"). It forks and re-execs itself for
# SECONDS, each fresh image checking its .rodata, .data, heap and stack, prints an `INIT32: DONE` line and
# ends the VM. On this host it dies at its first system call (docs/kvm-facts.md). --init32-int80: its
# system calls through int $0x80 instead.
if [ -n "$init32" ]; then
	rm -rf "$root"
	mkdir -p "$root"/{dev,proc}
	gcc -m32 -static -nostdlib -ffreestanding -fno-pie -no-pie -O2 -fno-builtin \
		-fno-tree-loop-distribute-patterns -fno-stack-protector -mgeneral-regs-only \
		$init32_flags -o "$root/init" "$here/linux-boot/init32.c"
	append="$append init32_secs=$init32 print-fatal-signals=1"
fi
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initramfs.cpio"

log=$work/boot-$format-$irqchip-$cpus.log
# init_on_alloc=0: Debian zeroes every page allocation by default, which under the emulator costs
# minutes of boot. On this host the guest's CPUID shows XSAVE, SMAP, FSGSBASE, POPCNT, RDRAND and
# RDSEED whatever KVM_SET_CPUID2 says (docs/kvm-facts.md, "CPUID here"), and the emulator cannot run
# xrstor, clac/stac or popcnt: Linux's own switches turn them off. noxsave and nofsgsbase exist in
# 6.1; the others through clearcpuid= (X86_FEATURE_* as word*32+bit: POPCNT 151, RDRAND 158,
# RDSEED 306, SMAP 308; 6.1 has no nosmap any more). The kernel's own SIMD code cannot run in the
# emulator either (it stopped on the ldmxcsr of kernel_fpu_begin_mask once blake2s_mod_init had
# switched random.c's BLAKE2s to SSSE3): PCLMULQDQ 129, SSSE3 137, SSE4.1 147, SSE4.2 148 and
# AES 153 are cleared too (AVX and later already go with noxsave).
cmdline="console=ttyS0 earlyprintk=ttyS0 printk.time=1 panic=-1 reboot=k init_on_alloc=0"
cmdline="$cmdline noxsave nofsgsbase clearcpuid=129,137,147,148,151,153,158,306,308 irqvm.cpus=$cpus"
# Boot time under the emulator (docs/benchmarks.md, "Booting Linux", where the time goes): skip
# the built-in initcalls that only prepare tracing and cost minutes of emulated kallsyms and
# string work (ftrace's weak-function check looks up all 37,697 ftrace records in kallsyms; the
# eval-map update and tracefs population rewrite every trace event's format and create
# thousands of tracefs files; kprobe events wait for them); no hung-task or soft-lockup reports
# (the ticks and tracing work starve the CPU for minutes; each report prints a stack trace);
# trust the TSC (no clocksource watchdog, no timer check); no speculation mitigations (their
# run-time cost is paid per kernel entry); no audit, PSI accounting or crypto self-tests; no
# PCI (irqvm has none: no probing); nokaslr keeps the symbol addresses of linux-profile.py.
# The second list skips the built-in BPF kfunc registrations (TCP CUBIC's among them: TCP falls back
# to Reno), the first of which parses the kernel's whole BTF (`btf_parse_vmlinux`): about 6 minutes
# of emulated work with an RCU stall report (docs/benchmarks.md, "Booting Linux").
cmdline="$cmdline initcall_blacklist=ftrace_check_for_weak_functions,trace_eval_init,tracer_init_tracefs,init_kprobe_trace"
cmdline="$cmdline initcall_blacklist=cubictcp_register,bpf_rstat_kfunc_init,bpf_key_sig_kfuncs_init,kfunc_init,bpf_prog_test_run_init,bpf_tcp_ca_kfunc_init"
cmdline="$cmdline sysctl.kernel.hung_task_timeout_secs=0 nosoftlockup nmi_watchdog=0"
cmdline="$cmdline tsc=reliable no_timer_check mitigations=off nokaslr audit=0 psi=0"
cmdline="$cmdline cryptomgr.notests pci=off rcupdate.rcu_expedited=1"
# Linux's periodic tick on a timer without a periodic mode (TSC deadline) runs a whole tick for
# every period it finds already past, until one takes less than a period (4 ms): under this host's
# emulator, with vCPUs sharing cores, one can take longer, and a CPU whose tick came late (the
# switch to kvm-clock runs under stop_machine, IF clear everywhere) never gets out. The LAPIC
# timer's periodic mode has no such loop (docs/benchmarks.md, "The tick livelock, found").
[ "$tsc_deadline" = on ] || cmdline="$cmdline lapic=notscdeadline"
[ -z "$append" ] || cmdline="$cmdline $append"
api_args=()
[ -z "$api" ] || api_args=(--api-sock "$api")
echo "linux-boot: $(basename "$kernel") ($format), $cpus vCPUs, $irqchip irqchip; log $log"
start=$(date +%s.%N)
set +e
# --exact on|off: irqvm's --exact-irq-boundaries (default: irqvm's own, on in `user` and `split`).
exact_args=()
[ -z "$exact" ] || exact_args=(--exact-irq-boundaries="$exact")
# --syscall-watch on|off: irqvm's (default on; docs/architecture.md, "SYSCALL from user mode").
[ -z "$syscall_watch" ] || exact_args+=(--syscall-watch "$syscall_watch")
# --kvm-stats FILE: irqvm's --kvm-stats, KVM's statistics of the VM every 10 s and at the end
# (docs/operations.md); the boot is often ended by `timeout`, so the series matters.
[ -z "$kvm_stats" ] || exact_args+=(--kvm-stats "$kvm_stats" --kvm-stats-every 10)
timeout --signal=TERM "$timeout" "$irqvm" run --kernel "$kernel" --initrd "$work/initramfs.cpio" \
	--cmdline "$cmdline" --cpus "$cpus" --memory "$memory" --irqchip "$irqchip" \
	"${exact_args[@]}" "${api_args[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
end=$(date +%s.%N)
echo "linux-boot: irqvm exit status $status after $(echo "$end - $start" | bc) s"
# isa-debug-exit: irqvm-exit 0 -> status 1 (every check passed), 1 -> 3.
[ -z "$init32" ] || { grep -q '^INIT32: DONE' "$log" && [ "$status" = 1 ] && exit 0; exit 1; }
grep -q '^DONE: [0-9]* passed, 0 failed' "$log" && [ "$status" = 1 ] && exit 0
[ "$status" = 124 ] && echo "linux-boot: timed out after $timeout s"
exit 1
