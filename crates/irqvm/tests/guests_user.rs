//! The guest test kernels on the `user` irqchip (every interrupt controller in userspace, from
//! the `irqchip` crate), on 1, 2 and 4 vCPUs. Each run must print exactly the checks and
//! outcomes guests/expect/NAME.txt lists in its `user` column: everything passes here, including
//! the checks KVM's in-kernel LAPIC fails in the other modes (`[isr-kept]`,
//! `[kvm-apic-en-keeps-regs]`, `[kvm-init-fsgs-msr]`) and the lowest-priority checks that need
//! real PPR arbitration (lowest PPR wins, ties round-robin; `[kvm-vector-hashing]`).

#[macro_use]
mod common;

use irqvm::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::User;

guest_tests!(MODE;
    hello, smp_boot, init_again, init_state, ipi, x2apic, timer, tpr, ioapic, pic, storm, demo,
    once, latency, apic_base, apic_base_rsvd, timer_mode, nmi_queue, soft_int,
);

/// The guests that need a host thread beside them (tests below).
const HOST_DRIVEN: &[&str] = &["msi"];

#[test]
fn every_guest_runs_in_user_mode() {
    common::assert_every_guest_runs(STANDALONE, HOST_DRIVEN);
}

#[test]
fn storm_with_host_device_lines_counts_exactly() {
    common::check_storm_with_host_line(MODE);
}

/// MSIs from a host thread (`RunningVm::signal_msi`): see `common::check_msi_from_host`.
#[test]
fn msi_from_host_reaches_the_addressed_cpu_exactly_once() {
    common::check_msi_from_host(MODE);
}
