#!/bin/sh
# trace-pictures.sh: regenerates the two timelines of docs/operations.md ("Reading a trace") from the
# build's own guests in user mode: the storm guest on 2 vCPUs (an IPI storm with IOAPIC edge lines) and
# the ioapic guest on 1 vCPU (a level-triggered pin held across its EOI). Each run records with
# --trace; `irqvm trace report --svg --focus` draws the window around one interrupt (line
# assertions, posts, injections, EOIs, kicks and wake-ups). The figures are
# this host's (timings vary from run to run); the traces stay in $OUT (default a temporary directory).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../../.." && pwd)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out/guests"
make -s -C "$root/crates/irqvm/guests" OUT="$out/guests"
# PROFILE=debug uses the debug build (a slower VMM: the figures change, the story does not).
profile=${PROFILE:-release}
if [ "$profile" = release ]; then
	(cd "$root" && cargo build --release --quiet --bin irqvm)
else
	(cd "$root" && cargo build --quiet --bin irqvm)
fi
irqvm=$root/target/$profile/irqvm
# run GUEST CPUS NAME: a passing guest writes 0 to isa-debug-exit, so irqvm exits with status 1.
run() {
	status=0
	"$irqvm" run --kernel "$out/guests/$1.elf" --cpus "$2" --trace "$out/$3.json" >"$out/$3.log" || status=$?
	grep -q ' 0 failed' "$out/$3.log" && [ "$status" -eq 1 ] || { echo "$1 failed: see $out/$3.log" >&2; exit 1; }
}
run storm 2 storm
"$irqvm" trace report "$out/storm.json" --svg "$root/docs/trace-storm.svg" --focus 0x91
run ioapic 1 level
"$irqvm" trace report "$out/level.json" --svg "$root/docs/trace-level.svg" --focus 0x71
echo "traces and guest output in $out"
