//! The guest test kernels on the `split` irqchip (local APICs in KVM, IOAPIC and 8259 PIC in
//! userspace), on 1, 2 and 4 vCPUs. Each run must print exactly the checks and outcomes
//! guests/expect/NAME.txt lists in its `split` column.
//!
//! The host limits listed there (`fail`/`flaky`, by exact check name) are those of KVM's LAPIC
//! here (docs/irqchip-modes.md, "Known KVM limits"), the same as in kernel mode because the LAPIC
//! is KVM's in both:
//! * `[isr-kept]` (tpr, ioapic, once, pv_eoi): a delivered vector does not stay in KVM's LAPIC ISR
//!   until the guest's EOI (KVM EOIs it as it delivers it), so KVM never sets the PV EOI bit
//!   either. For a level-triggered IOAPIC pin this means KVM reports the EOI
//!   (KVM_EXIT_IOAPIC_EOI) as soon as the vector is taken, so a line held high is delivered
//!   again before the handler's own EOI. In `once`, a level line lowered by its handler before
//!   the EOI is then delivered twice whenever the vCPU leaves the guest between taking the
//!   vector and the handler's port write (rarely in split mode, where the early EOI reaches
//!   userspace only at the vCPU's next exit: `flaky`; pv_eoi's level check alike).
//! * `[kvm-init-fsgs-msr]` (init_state): after KVM's INIT, RDMSR of IA32_FS_BASE / IA32_GS_BASE
//!   returns the old values although memory accesses use base 0.
//! * `[kvm-vector-hashing]` (ipi, x2apic): KVM picks the lowest-priority target by vector hashing,
//!   not by PPR.

#[macro_use]
mod common;

use irqvm::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::Split;

guest_tests!(MODE;
    hello, smp_boot, init_again, init_state, ipi, x2apic, timer, tpr, ioapic, pic, storm, demo,
    once, latency, apic_base, apic_base_rsvd, lapic_regs, timer_mode, nmi_queue, fuzz, soft_int, snapstorm, xstate,
    x2apic_boot, irq_boundary, mm_reuse, lp_tpr_race, pv_eoi, smi, msi_doorbell, regdiff,
);

// x2apic_boot on the larger counts its expectation file lists (guest_tests! runs 1, 2 and 4).
x2apic_boot_tests!(MODE;
    ci: x2apic_boot_on_64 = 64, x2apic_boot_on_255 = 255, x2apic_boot_on_256 = 256,
        x2apic_boot_on_288 = 288;
    too_slow: x2apic_boot_on_1024 = 1024
);

/// The guests that need a host thread beside them (tests below).
const HOST_DRIVEN: &[&str] = &["msi"];

#[test]
fn every_guest_runs_in_split_mode() {
    // protected_aps is user-mode only (`-` in this column of its expectation file).
    common::assert_every_guest_runs(
        MODE,
        STANDALONE,
        &[HOST_DRIVEN, &["syscall", "syscall_smp", "tlb_shootdown"]].concat(),
    );
}

/// The built-in demo (`irqvm` with no arguments) on its 4 vCPUs.
#[test]
fn builtin_demo_runs_on_four_vcpus() {
    let mut cfg = irqvm::cli::demo_config();
    cfg.irqchip = MODE;
    let _one = common::exclusive();
    common::run_vm(cfg).assert_expected("demo", MODE, 4);
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

/// guests/syscall.c: SYSCALL from user mode and SYSRETQ, with irqvm's SYSCALL watch
/// (`emulate::syscall`) on this host.
#[test]
fn syscall() {
    common::check_syscall(MODE);
}

/// guests/syscall_smp.c: system calls that write FS and GS bases on every vCPU at once, under
/// timer interrupts and IPIs, with irqvm's SYSCALL watch (`emulate::syscall`) on this host.
#[test]
fn syscall_smp() {
    common::check_syscall_smp(MODE);
}

/// guests/tlb_shootdown.c: a user-mode reader on one vCPU never sees a stale page after another
/// vCPU remapped it and flushed with an IPI; the figures of the pv-flush and no-flush phases go to
/// stderr.
#[test]
fn tlb_shootdown() {
    common::check_tlb_shootdown(MODE);
}
