#!/usr/bin/env bash
# A fast reproducer for the wrong-page reads of SMP Linux boots on this host (docs/kvm-facts.md,
# "User-mode reads through a page the guest does not map"): boot Linux once with linux-boot.sh,
# snapshot it a second before it starts /init (the first user process), then restore that
# snapshot again and again, in any irqchip mode, and count the user processes that die. A boot
# to /init takes 8-15 minutes here; a restore reaches /init at once and runs the init script's
# checks in 1.5-5 minutes. Not part of ./test.sh or CI (each step takes minutes).
#
# Usage: linux-repro.sh snapshot DIR [linux-boot.sh options: --cpus N --irqchip MODE ...]
#        linux-repro.sh restore DIR RUNS [--irqchip MODE] [--timeout SECONDS] [--irqvm PATH]
#                       [--tag NAME] [irqvm restore options after --]
# `snapshot` writes DIR (guest memory and state.json) and lets the boot go on, so it is also one
# boot of linux-boot.sh (its log under $LINUX_BOOT_WORK). `restore` prints one line per run:
# the VM's exit status, seconds, the number of "segfault at" reports and of kernel panics, and
# the init script's DONE line; then the totals. Logs in ${REPRO_LOGS:-/tmp/irqvm-linux-repro}/TAG.
# Needs what linux-boot.sh needs, and curl (the control API).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
die() { echo "linux-repro: $*" >&2; exit 1; }

# Boots through linux-boot.sh with the control API on, and snapshots at the W+X check (the
# kernel's last line before "Run /init as init process").
take_snapshot() {
	local dir=$1; shift
	local work=${LINUX_BOOT_WORK:-/tmp/irqvm-linux-boot}
	local sock=$work/repro.sock log
	mkdir -p "$work"
	rm -rf "$dir" "$sock" "$work"/boot-*.log
	LINUX_BOOT_WORK=$work "$here/linux-boot.sh" --api-sock "$sock" "$@" &
	local boot=$!
	until log=$(ls "$work"/boot-*.log 2>/dev/null) && grep -q "Checked W+X mappings" "$log"; do
		kill -0 $boot 2>/dev/null || die "the boot ended before the W+X check"
		sleep 0.2
	done
	mkdir -p "$dir"
	curl -sf -X PUT --unix-socket "$sock" http://localhost/api/v1/vm.snapshot \
		-d "{\"destination_url\": \"file://$dir\"}" || die "vm.snapshot failed"
	echo "linux-repro: snapshot in $dir"
	curl -sf -X PUT --unix-socket "$sock" http://localhost/api/v1/vm.resume || die "vm.resume failed"
	wait $boot || true
}

# Restores DIR RUNS times and counts the dead processes of each run.
restore_runs() {
	local dir=$1 runs=$2; shift 2
	local irqchip= timeout=600 irqvm= tag=run
	while [ $# -gt 0 ]; do
		case $1 in
		--irqchip) irqchip=$2; shift 2 ;;
		--timeout) timeout=$2; shift 2 ;;
		--irqvm) irqvm=$2; shift 2 ;;
		--tag) tag=$2; shift 2 ;;
		--) shift; break ;;
		*) die "unknown argument $1" ;;
		esac
	done
	[ -f "$dir/state.json" ] || die "$dir holds no snapshot"
	if [ -z "$irqvm" ]; then
		(cd "$here/.." && cargo build --release --quiet --bin irqvm)
		irqvm=$(cd "$here/../../.." && pwd)/target/release/irqvm
	fi
	local logs=${REPRO_LOGS:-/tmp/irqvm-linux-repro}/$tag mode_args=()
	[ -z "$irqchip" ] || mode_args=(--irqchip "$irqchip")
	mkdir -p "$logs"
	local i status start secs segv panics done_line dead=0 deaths=0
	for i in $(seq 1 "$runs"); do
		start=$(date +%s)
		set +e
		IRQVM_LOG=${IRQVM_LOG:-warn} "$irqvm" restore --snapshot "$dir" "${mode_args[@]}" \
			--timeout "$timeout" "$@" >"$logs/run$i.log" 2>&1
		status=$?
		set -e
		secs=$(($(date +%s) - start))
		segv=$(grep -c "segfault at" "$logs/run$i.log" || true)
		panics=$(grep -c "Kernel panic" "$logs/run$i.log" || true)
		done_line=$(grep -m1 "^DONE:" "$logs/run$i.log" || echo "no DONE line")
		echo "$tag run $i: status $status, ${secs} s, $segv segfaults, $panics panics, $done_line"
		[ "$segv" = 0 ] || dead=$((dead + 1))
		deaths=$((deaths + segv))
	done
	echo "$tag: $dead of $runs runs had a process die ($deaths segfaults); logs in $logs"
}

case ${1:-} in
snapshot) [ $# -ge 2 ] || die "usage: linux-repro.sh snapshot DIR [linux-boot.sh options]"
	shift; take_snapshot "$@" ;;
restore) [ $# -ge 3 ] || die "usage: linux-repro.sh restore DIR RUNS [options]"
	shift; restore_runs "$@" ;;
*) die "usage: linux-repro.sh snapshot DIR [...] | restore DIR RUNS [...]" ;;
esac
