#!/bin/sh
# run-qemu.sh NAME [SMP] [ACCEL]: runs guest NAME under QEMU (the reference) and prints its serial output.
# SMP defaults to 4, ACCEL to tcg (tcg | kvm); env CPU overrides -cpu, TIMEOUT the seconds allowed, OUT the build dir. Builds the guest first if needed (OUT defaults to build/).
# Exit status: 0 if the guest wrote 0 to isa-debug-exit (all checks passed), 1 if it reported failures,
# 2 on timeout or any other way of ending (QEMU's own status is printed as "qemu-status: N").
set -u
here=$(cd "$(dirname "$0")" && pwd)
name=${1:?usage: run-qemu.sh NAME [SMP] [ACCEL]}
smp=${2:-4}
accel=${3:-tcg}
out=${OUT:-$here/build}
timeout_s=${TIMEOUT:-120}
# kvm_pvm rejects the IA32_ARCH_CAPABILITIES value QEMU sets for -cpu max/host: drop that feature under KVM.
if [ "$accel" = kvm ]; then cpu=${CPU:-max,-arch-capabilities}; else cpu=${CPU:-max}; fi
make -s -C "$here" OUT="$out" "$out/$name.elf" >&2 || exit 2
timeout "$timeout_s" qemu-system-x86_64 -machine pc -accel "$accel" -cpu "$cpu" -smp "$smp" -m 128 \
	-kernel "$out/$name.elf" -display none -serial stdio -monitor none -nic none \
	-device isa-debug-exit,iobase=0xf4,iosize=0x04 -device pc-testdev -no-reboot
status=$?
echo "qemu-status: $status"
case $status in
	1) exit 0 ;;   # guest wrote 0: (0 << 1) | 1
	3) exit 1 ;;   # guest wrote 1: (1 << 1) | 1
	*) exit 2 ;;
esac
