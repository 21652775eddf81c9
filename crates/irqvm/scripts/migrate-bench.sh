#!/usr/bin/env bash
# Live migration times (docs/benchmarks.md, "Live migration"): the `snapstorm` guest (IPIs between
# all vCPUs, NMIs, IOAPIC lines, MSIs, the three LAPIC timer modes) runs on CPUS vCPUs with MEMORY
# of RAM in SOURCE mode; after 1 s of storm it is migrated with `PUT /api/v1/vm.send-migration` to
# an `irqvm restore --incoming` in TARGET mode on this machine, which is then shut down. For guest
# memory 16 MiB to 1 GiB on 4 vCPUs and 1 to 16 vCPUs with 256 MiB. Prints one line per run:
#   SOURCE->TARGET MEMORY CPUS rounds pages_per_round final_pages pause_ms downtime_ms total_ms restore_ms
# from the source's report (`vm.send-migration`'s answer): pages_per_round lists the rounds while
# the guest ran (the first: every page that is not zero); pause_ms is the pause request to every
# vCPU's state captured; downtime_ms the pause request to the target's answer that the guest runs
# there; restore_ms the target's own time to build the VM from the received state.
# Usage: migrate-bench.sh [IRQVM_BINARY] [SOURCE_MODE] [TARGET_MODE] [REPEATS]
# The guest: $GUEST, else snapstorm.elf from the binary's build directory.
set -euo pipefail
bin=${1:-target/release/irqvm}
from=${2:-user}
to=${3:-$from}
repeats=${4:-3}
guest=${GUEST:-$(find "$(dirname "$bin")/build" -name snapstorm.elf -path '*irqvm-*' | head -1)}
[ -f "$guest" ] || { echo "no snapstorm.elf: set GUEST" >&2; exit 2; }
work=$(mktemp -d /tmp/irqvm-migbench.XXXXXX)
trap 'rm -rf "$work"' EXIT

wait_socket() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; return 1; }

run_one() { # memory cpus
	local mem=$1 cpus=$2 incoming="$work/in.sock" tapi="$work/target.sock" sapi="$work/source.sock"
	rm -f "$incoming" "$tapi" "$sapi"
	"$bin" restore --incoming "$incoming" --irqchip "$to" --api-sock "$tapi" >/dev/null 2>&1 &
	local target=$!
	wait_socket "$incoming"
	"$bin" run --kernel "$guest" --cpus "$cpus" --memory "$mem" --irqchip "$from" \
		--cmdline rounds=100000 --api-sock "$sapi" >/dev/null 2>&1 &
	local source=$!
	wait_socket "$sapi"
	sleep 1
	local report
	report=$(curl -s -m 300 -X PUT --unix-socket "$sapi" http://localhost/api/v1/vm.send-migration \
		-d "{\"destination_url\": \"unix:$incoming\"}")
	wait_socket "$tapi" || true
	curl -s -X PUT --unix-socket "$tapi" http://localhost/api/v1/vm.shutdown >/dev/null || true
	curl -s -X PUT --unix-socket "$sapi" http://localhost/api/v1/vm.shutdown >/dev/null 2>&1 || true
	wait "$source" || true
	kill "$target" 2>/dev/null || true
	wait "$target" || true
	REPORT="$report" python3 - "$from->$to" "$mem" "$cpus" <<'PY'
import json, os, sys
label, mem, cpus = sys.argv[1:4]
try:
    r = json.loads(os.environ["REPORT"])
    pages = "/".join(str(x["pages"]) for x in r["rounds"])
    print(f'{label} {mem} {cpus} {len(r["rounds"])} {pages} {r["final_pages"]} '
          f'{r["pause_ms"]:.1f} {r["downtime_ms"]:.1f} {r["total_ms"]:.1f} '
          f'{r["target"].get("restore_ms", 0):.1f}')
except Exception:
    print(f'{label} {mem} {cpus} FAILED: {os.environ["REPORT"]}')
PY
}

for mem in 16M 64M 256M 1G; do
	for _ in $(seq "$repeats"); do run_one "$mem" 4; done
done
for cpus in 1 2 8 16; do
	for _ in $(seq "$repeats"); do run_one 256M "$cpus"; done
done
