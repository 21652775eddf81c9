#!/usr/bin/env bash
# The short Linux boot that CI runs (.ci/run): Debian's unmodified kernel through the PVH entry (or
# its bzImage) on irqvm until a known early serial line, then the VM is stopped. It covers the boot
# path of linux-boot.sh up to that line (loader, hvm_start_info or zero page, ACPI RSDP, CPUID
# hiding, the serial port, kvmclock) in minutes less than a full boot, which takes far longer
# under this host's instruction emulator (docs/benchmarks.md, "Booting Linux").
#
# Usage: linux-early.sh [--irqchip user|split|kernel] [--cpus N] [--format vmlinux|bzimage]
#                       [--until TEXT] [--timeout SECONDS] [--irqvm PATH]
# Default line: "Booting paravirtualized kernel on KVM" (start_kernel, after setup_arch has read the
# memory map, ACPI tables and kvmclock). Budget: --timeout (default 300 s); measured times in
# docs/benchmarks.md, "Booting Linux".
# CI runs it twice: the vmlinux (PVH) and the bzImage (64-bit boot protocol), both `user`.
# Needs: apt-get install -y linux-image-cloud-amd64 lz4
# Exit status: 0 if the line appeared in time, 1 otherwise (the serial log is printed).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
die() { echo "linux-early: $*" >&2; exit 1; }

irqchip=user cpus=1 format=vmlinux timeout=300 irqvm=
until_text="Booting paravirtualized kernel on KVM"
while [ $# -gt 0 ]; do
	case $1 in
	--irqchip) irqchip=$2; shift 2 ;;
	--cpus) cpus=$2; shift 2 ;;
	--format) format=$2; shift 2 ;;
	--until) until_text=$2; shift 2 ;;
	--timeout) timeout=$2; shift 2 ;;
	--irqvm) irqvm=$2; shift 2 ;;
	*) die "unknown argument $1" ;;
	esac
done

bzimage=$(ls /boot/vmlinuz-*-cloud-amd64 2>/dev/null | sort -V | tail -1)
[ -n "$bzimage" ] || die "no /boot/vmlinuz-*-cloud-amd64: apt-get install linux-image-cloud-amd64"
if [ -z "$irqvm" ]; then
	(cd "$here/.." && cargo build --release --quiet --bin irqvm)
	irqvm=$(cd "$here/../../.." && pwd)/target/release/irqvm
fi

work=$(mktemp -d)
pid=
cleanup() {
	[ -z "$pid" ] || kill "$pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
kernel=$bzimage
if [ "$format" = vmlinux ]; then
	kernel=$work/vmlinux
	"$here/extract-vmlinux.sh" "$bzimage" "$kernel" >/dev/null
fi

# The same host-specific switches as linux-boot.sh (see there). The initrd is 8 KiB of zeros:
# the line comes long before Linux unpacks it, but setup_arch reserves it ("RAMDISK: [mem ...]"),
# which shows the boot protocol passed its place (hvm_start_info's module list or the zero
# page's ramdisk_image / ramdisk_size).
cmdline="console=ttyS0 earlyprintk=ttyS0 printk.time=1 panic=-1 reboot=k noxsave nofsgsbase"
cmdline="$cmdline clearcpuid=129,137,147,148,151,153,158,306,308 nokaslr"
head -c 8192 /dev/zero >"$work/initrd"
log=$work/serial.log
start=$(date +%s%3N)
"$irqvm" run --kernel "$kernel" --initrd "$work/initrd" --cmdline "$cmdline" --cpus "$cpus" \
	--irqchip "$irqchip" --timeout "$timeout" >"$log" 2>&1 &
pid=$!
found=0
while kill -0 "$pid" 2>/dev/null; do
	if grep -qF "$until_text" "$log"; then
		found=1
		break
	fi
	sleep 0.5
done
# A last look: the VM may have ended right after printing the line.
[ $found = 1 ] || ! grep -qF "$until_text" "$log" || found=1
ms=$(($(date +%s%3N) - start))
elapsed=$((ms / 1000)).$((ms % 1000 / 100))
if [ $found = 0 ]; then
	cat "$log"
	echo "linux-early: \"$until_text\" not seen ($format, $cpus vCPUs, $irqchip; $elapsed s)" >&2
	exit 1
fi
echo "linux-early: $(basename "$kernel") ($format), $cpus vCPUs, $irqchip: \"$until_text\" after $elapsed s"
# What Linux read of irqvm's platform before that line, checked only when the line is the
# default one (all of these come before it): what the boot protocol (PVH or the bzImage's zero
# page) passed, the command line, the memory map (irqvm's RAM above 1 MiB) and the initrd; the
# ACPI tables found through the RSDP, the MADT's IOAPIC, ISA override and one local APIC per
# vCPU, TSC-deadline, and kvmclock's TSC frequency.
failed=0
expect() {
	if grep -qE "$1" "$log"; then
		echo "PASS: $2"
	else
		echo "FAIL: $2 (no line matching /$1/)"
		failed=1
	fi
}
if [ "$until_text" = "Booting paravirtualized kernel on KVM" ]; then
	expect "Command line: $cmdline.?\$" "command line from the boot protocol (whole: the line may end in CR)"
	expect 'BIOS-e820: \[mem 0x0000000000100000-0x[0-9a-f]+\] usable' "RAM above 1 MiB in the memory map"
	expect 'RAMDISK: \[mem 0x[0-9a-f]+-0x[0-9a-f]+\]' "initrd placed and passed"
	expect 'ACPI: RSDP 0x00000000000E0000' "RSDP found in the BIOS area"
	expect 'ACPI: APIC 0x' "MADT listed in the XSDT"
	expect 'IOAPIC\[0\]: apic_id 0, version [0-9]+, address 0xfec00000, GSI 0-23' "IOAPIC from the MADT (its version is the model's: irqvm's or KVM's)"
	expect 'INT_SRC_OVR \(bus 0 bus_irq 0 global_irq 2' "ISA IRQ 0 -> GSI 2 override"
	expect "smpboot: Allowing $cpus CPUs, 0 hotplug CPUs" "$cpus local APIC(s) in the MADT"
	expect 'TSC deadline timer available' "TSC-deadline in CPUID"
	expect 'tsc: Detected [0-9.]+ MHz processor' "TSC frequency from kvmclock (no PIT calibration)"
fi
exit $failed
