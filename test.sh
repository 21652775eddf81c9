#!/usr/bin/env bash
# Runs every test of irqvm: the unit, property and integration tests of the workspace, then the
# loom model of the cross-thread protocols (a separate build, since loom replaces the atomics).
set -euo pipefail
cd "$(dirname "$0")"
cargo test --workspace
cargo test -p irqchip --release --features loom --test loom_posting
cargo test -p irqchip --release --features loom,broken-ordering --test loom_posting
cargo test -p irqchip --release --features loom,broken-init-deferral --test loom_posting
cargo test -p irqchip --release --features loom,broken-class-order --test loom_posting
cargo test -p irqchip --release --features loom,broken-deferral-notified --test loom_posting
cargo test -p irqchip --release --features loom,broken-pv-eoi-order --test loom_posting
cargo test -p irqchip --release --features loom --test loom_wake
cargo test -p irqchip --release --features loom,broken-shared-bell --test loom_wake
