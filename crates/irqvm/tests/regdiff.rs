//! The differential guest (guests/regdiff.c): on a few seeds, `user` and `split` mode must print
//! the same transcript as `kernel` mode, KVM's own LAPIC, IOAPIC and PIC: after each of its random
//! operations on CPU 0's interrupt controllers (register writes and reads in xAPIC and x2APIC
//! mode, IA32_APIC_BASE transitions, IPIs to itself and to absent CPUs, TSC deadlines, CR8,
//! IOAPIC programming and line changes, 8259 and ELCR programming) every register the guest
//! can read, and what the operation itself read. `irqvm diff-guest --seconds N` runs more seeds.

#[macro_use]
mod common;

use irqvm::diffguest::{compare_seed, RUN_TIMEOUT};
use irqvm::IrqchipMode;

/// The seeds CI runs, and their operations.
const SEEDS: [u64; 2] = [1, 2];
const OPS: u32 = 500;

#[test]
fn user_and_split_mode_read_what_kernel_mode_reads() {
    let _one = common::exclusive();
    for seed in SEEDS {
        if let Err(failure) = compare_seed(
            seed,
            OPS,
            &[IrqchipMode::User, IrqchipMode::Split],
            RUN_TIMEOUT,
        ) {
            panic!("{failure}");
        }
    }
}
