#!/usr/bin/env bash
# Snapshot and restore times (docs/benchmarks.md, "Snapshot and restore"): a guest that spins
# (`jmp .` loaded raw at 1 MiB; its APs stay in wait-for-SIPI) is snapshotted through the control
# API and restored, for guest memory 16 MiB to 1 GiB on 2 vCPUs and 1 to 16 vCPUs with 128 MiB,
# in one irqchip mode (default user). Prints one line per run:
#   MODE MEMORY CPUS snapshot_ms restore_ms
# snapshot_ms: the `vm.snapshot` request, pause to files written (curl's total time);
# restore_ms: `irqvm restore` from start to the VM built with its state applied (its own log).
# Usage: snapshot-bench.sh [IRQVM_BINARY] [MODE] [REPEATS]
set -euo pipefail
bin=${1:-target/release/irqvm}
mode=${2:-user}
repeats=${3:-3}
work=$(mktemp -d /tmp/irqvm-snapbench.XXXXXX)
trap 'rm -rf "$work"' EXIT
printf '\xeb\xfe' >"$work/spin.bin"

run_one() { # memory cpus
	local mem=$1 cpus=$2 sock="$work/api.sock" dir="$work/snap"
	rm -rf "$dir" "$sock"
	"$bin" run --kernel "$work/spin.bin" --raw-at 0x100000 --cpus "$cpus" --memory "$mem" \
		--irqchip "$mode" --api-sock "$sock" >/dev/null 2>&1 &
	local pid=$!
	for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
	sleep 0.2
	local snap
	snap=$(curl -s -o /dev/null -w '%{time_total}' -X PUT --unix-socket "$sock" \
		http://localhost/api/v1/vm.snapshot -d "{\"destination_url\": \"file://$dir\"}")
	curl -s -X PUT --unix-socket "$sock" http://localhost/api/v1/vm.shutdown >/dev/null || true
	wait "$pid" || true
	rm -f "$sock"
	# Restore paused (the spinning guest never ends), read the restore's own time, stop it.
	IRQVM_LOG=info "$bin" restore --snapshot "$dir" --irqchip "$mode" --paused \
		--api-sock "$sock" >/dev/null 2>"$work/restore.log" &
	pid=$!
	for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
	curl -s -X PUT --unix-socket "$sock" http://localhost/api/v1/vm.shutdown >/dev/null || true
	wait "$pid" || true
	local restore
	restore=$(sed 's/\x1b\[[0-9;]*m//g' "$work/restore.log" |
		sed -n 's/.*snapshot restored elapsed=\([0-9.]*\)\(ms\|s\|µs\) .*/\1 \2/p' | head -1 |
		awk '{ v=$1; if ($2=="s") v*=1000; else if ($2=="µs") v/=1000; printf "%.1f", v }')
	printf '%s %s %s %.1f %s\n' "$mode" "$mem" "$cpus" "$(echo "$snap * 1000" | bc -l)" "${restore:-?}"
}

for mem in 16M 64M 256M 1G; do
	for _ in $(seq "$repeats"); do run_one "$mem" 2; done
done
for cpus in 1 2 4 8 16; do
	for _ in $(seq "$repeats"); do run_one 128M "$cpus"; done
done
