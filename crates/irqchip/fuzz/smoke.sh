#!/usr/bin/env bash
# Short coverage-guided run of every irqchip fuzz target (docs/fuzzing.md).
#   crates/irqchip/fuzz/smoke.sh SECONDS [TARGET...]
# SECONDS is the total budget, shared evenly by the targets. Each target starts from its
# committed corpus (read-only) and writes what it finds to a scratch directory; a failing
# input is left in artifacts/<target>/ and the script exits non-zero.
# Needs cargo-fuzz (`cargo install cargo-fuzz`); works on the stable toolchain as is, since
# without a sanitizer cargo-fuzz passes rustc no -Z flag.
set -euo pipefail
cd "$(dirname "$0")"
budget=${1:?usage: smoke.sh SECONDS [TARGET...]}
shift
targets=("$@")
if [ ${#targets[@]} = 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^irqchip-fuzz$')
fi
per_target=$(( budget / ${#targets[@]} ))
[ "$per_target" -ge 1 ] || per_target=1
# -s none: the model is #![forbid(unsafe_code)], so AddressSanitizer would find nothing;
# -a: debug assertions, so arithmetic overflow panics as it does in `cargo test`.
cargo fuzz build -s none -a
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  mkdir -p "$scratch/$target" "corpus/$target"
  echo "== $target: ${per_target}s"
  log="$scratch/$target.log"
  if ! cargo fuzz run -s none -a "$target" "$scratch/$target" "corpus/$target" -- \
    -max_total_time="$per_target" -max_len=8192 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "$target: FAILED (the input is in artifacts/$target/)"
    exit 1
  fi
  grep -E '^#[0-9]+[[:space:]]+DONE|^stat::number_of_executed_units' "$log" || true
done
echo "smoke: ${#targets[@]} targets, ${per_target}s each, no failure"
