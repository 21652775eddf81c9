//! The differential guest (guests/regdiff.c): on a few seeds, `user` and `split` mode must print
//! the same transcript as `kernel` mode, KVM's own LAPIC, IOAPIC and PIC: after each of its random
//! operations on the interrupt controllers (register writes and reads in xAPIC and x2APIC mode,
//! IA32_APIC_BASE transitions, IPIs to itself, to absent CPUs and, on two vCPUs, between CPU 0
//! and CPU 1, TSC deadlines, CR8, IOAPIC programming and line changes, 8259 and ELCR programming)
//! every register the guest can read on each CPU, and what the operation itself read.
//! `irqvm diff-guest --seconds N` runs more seeds.

#[macro_use]
mod common;

use irqvm::diffguest::{compare_seed, DiffCase, RUN_TIMEOUT};
use irqvm::IrqchipMode;

/// The cases CI runs, as (seed, operations, vCPUs): CPU 0 alone, and CPU 0 and CPU 1 with IPIs
/// between them.
const CASES: [(u64, u32, u32); 3] = [(1, 400, 1), (2, 400, 1), (1, 300, 2)];

#[test]
fn user_and_split_mode_read_what_kernel_mode_reads() {
    let _one = common::exclusive();
    for (seed, ops, cpus) in CASES {
        let case = DiffCase { seed, ops, cpus };
        let modes = [IrqchipMode::User, IrqchipMode::Split];
        let start = std::time::Instant::now();
        if let Err(failure) = compare_seed(case, &modes, RUN_TIMEOUT) {
            panic!("{failure}");
        }
        eprintln!(
            "regdiff: seed {seed}, {ops} operations on {cpus} vCPU(s): the same in every mode ({:.1} s)",
            start.elapsed().as_secs_f64()
        );
    }
}
