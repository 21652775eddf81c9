//! Coverage-guided fuzz targets for the `irqchip` crate's guest-facing interfaces, and the
//! invariants they check (docs/fuzzing.md). Each target is a plain function of a byte string:
//! `fuzz_targets/*.rs` hand it to libFuzzer, and `crates/irqchip/tests/fuzz_corpus.rs` replays
//! the committed corpus through the same functions in every `cargo test`, without a fuzzer.
//!
//! This file is also compiled as a module of that test (`#[path]`), so modules refer to each
//! other with `super::`, never `crate::`.

pub mod apic;
pub mod chip;
pub mod devices;
pub mod diff;
pub mod input;
pub mod lapic;
pub mod prio;
pub mod snapshot;

/// A target's body: any byte string is a valid input; a violated invariant panics.
pub type Target = fn(&[u8]);

/// Every target: its name (the `fuzz_targets/` file and the `corpus/` directory) and its body.
pub const TARGETS: &[(&str, Target)] = &[
    ("lapic_regs", lapic::run),
    ("ioapic_window", devices::ioapic),
    ("pic_ports", devices::pic),
    ("msi_decode", devices::msi),
    ("routing_updates", devices::routing),
    ("snapshot_restore", snapshot::run),
    ("chip_sequence", chip_sequence),
];

/// `chip_sequence` without its statistics.
pub fn chip_sequence(data: &[u8]) {
    chip::run(data);
}
