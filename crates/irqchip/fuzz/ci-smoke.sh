#!/usr/bin/env bash
# CI's fuzzer smoke (docs/fuzzing.md): builds the fuzz targets with plain cargo and the flags
# `cargo fuzz build -s none -a` passes (no cargo-fuzz install: that alone took ~10 minutes on the
# CI machine), then runs every target from its committed corpus for a few seconds.
#   crates/irqchip/fuzz/ci-smoke.sh [SECONDS_PER_TARGET [TARGET...]]   (default 5 s, every target)
# Extra libFuzzer flags may be given in CI_SMOKE_LIBFUZZER_ARGS (docs/fuzzing.md shows the failure
# path with -rss_limit_mb=1).
# The corpus is read-only: new inputs go to a scratch directory. A failing input fails the
# script, which prints the target's log tail and the artifact's path (artifacts/<target>/...).
# CARGO_TARGET_DIR is honoured (CI measures a fresh one).
set -euo pipefail
cd "$(dirname "$0")"
per_target=${1:-5}
shift || true
triple=x86_64-unknown-linux-gnu

# The RUSTFLAGS of cargo-fuzz 0.13 (src/project.rs) for `build -s none -a` on Linux: SanitizerCoverage
# with inline 8-bit counters, PC table and comparison tracing (libFuzzer's feedback), no branch
# folding, stack-depth tracing, `--cfg fuzzing`, debug assertions (an overflow panics as in
# `cargo test`), one codegen unit. All are stable options: no -Z, no nightly.
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  --cfg fuzzing
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cdebug-assertions
  -Ccodegen-units=1
)
export RUSTFLAGS="${flags[*]}"
# --target keeps RUSTFLAGS away from build scripts (libfuzzer-sys's compiles libFuzzer's C++).
# opt-level 1 instead of cargo-fuzz's 3 (the instrumentation is the same): 142 s of CPU for the
# build instead of 179 s (docs/fuzzing.md, "CI smoke"); a few seconds of fuzzing need no -O3.
start=$(date +%s)
cargo build --locked --release --config 'profile.release.debug="line-tables-only"' \
  --config 'profile.release.opt-level=1' --target "$triple" --bins
echo "ci-smoke: build took $(( $(date +%s) - start ))s"
bin_dir=${CARGO_TARGET_DIR:-target}/$triple/release

targets=("$@")
if [ ${#targets[@]} = 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^irqchip-fuzz$')
fi
read -r -a extra <<<"${CI_SMOKE_LIBFUZZER_ARGS:-}"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
  [ -d "corpus/$target" ] || { echo "ci-smoke: corpus/$target is missing"; exit 1; }
  mkdir -p "$scratch/$target" "artifacts/$target"
  log="$scratch/$target.log"
  # The first corpus directory receives new inputs (scratch); the committed one is only read.
  if ! "$bin_dir/$target" "$scratch/$target" "corpus/$target" \
    -max_total_time="$per_target" -max_len=8192 -rss_limit_mb=2048 -timeout=30 \
    -artifact_prefix="artifacts/$target/" -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    tail -n 60 "$log"
    artifact=$(grep -o "artifacts/$target/[^ ]*" "$log" | tail -n 1 || true)
    echo "ci-smoke: $target FAILED; input: crates/irqchip/fuzz/${artifact:-artifacts/$target/ (none written)}"
    echo "ci-smoke: reproduce: cd crates/irqchip/fuzz && $bin_dir/$target ${artifact:-FILE}"
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  edges=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  echo "ci-smoke: $target ${per_target}s, ${runs:-?} executions, ${edges:-cov: ?}"
done
echo "ci-smoke: ${#targets[@]} targets, ${per_target}s each, no failure ($(( $(date +%s) - start ))s in all)"
