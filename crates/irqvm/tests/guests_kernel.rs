//! The guest test kernels on the `kernel` irqchip (KVM's in-kernel PIC, IOAPIC and LAPICs), on
//! 1, 2 and 4 vCPUs. Each run must print exactly the checks and outcomes guests/expect/NAME.txt
//! lists in its `kernel` column.
//!
//! The host limits listed there (`fail`, by exact check name) are those of KVM's LAPIC here
//! (docs/irqchip-modes.md, "Known KVM limits"): `[isr-kept]` (tpr, ioapic, once, pv_eoi: a
//! delivered vector does not stay in ISR until the EOI, so KVM never sets the PV EOI bit; in
//! `once` and pv_eoi KVM's IOAPIC always sees the early EOI while the line is still high),
//! `[kvm-init-fsgs-msr]` (init_state) and
//! `[kvm-vector-hashing]` (ipi, x2apic); see guests_split.rs for each.

#[macro_use]
mod common;

use common::run_guest;
use irqvm::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::Kernel;

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
fn every_guest_runs_in_kernel_mode() {
    // protected_aps is user-mode only (`-` in this column of its expectation file).
    common::assert_every_guest_runs(
        MODE,
        STANDALONE,
        &[HOST_DRIVEN, &["syscall", "syscall_smp", "tlb_shootdown"]].concat(),
    );
}

#[test]
fn hello_reports_cpu_count_and_ram_from_fw_cfg() {
    let _one = common::exclusive();
    let run = run_guest("hello", 2, MODE);
    run.assert_expected("hello", MODE, 2);
    assert!(
        run.output
            .contains("2 CPU(s), fw_cfg present, RAM 128 MiB, multiboot magic 2badb002"),
        "{}",
        run.output
    );
}

/// The built-in demo (`irqvm` with no arguments) on its 4 vCPUs: every CPU comes online.
#[test]
fn builtin_demo_runs_on_four_vcpus() {
    let mut cfg = irqvm::cli::demo_config();
    cfg.irqchip = MODE;
    let _one = common::exclusive();
    let run = common::run_vm(cfg);
    run.assert_expected("demo", MODE, 4);
    for cpu in 0..4 {
        assert!(
            run.output.contains(&format!("CPU {cpu} online")),
            "{}",
            run.output
        );
    }
}

/// The storm guest while a host thread pulses IOAPIC line 10 through KVM_IRQ_LINE (storm.c's
/// `host_link` handshake): KVM's IOAPIC and LAPICs deliver exactly the device interrupts raised
/// and every IPI once.
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
