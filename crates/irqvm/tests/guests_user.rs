//! The guest test kernels on the `user` irqchip (every interrupt controller in userspace, from
//! the `irqchip` crate), on 1, 2 and 4 vCPUs. Each run must print exactly the checks and
//! outcomes guests/expect/NAME.txt lists in its `user` column: everything passes here, including
//! the checks KVM's in-kernel LAPIC fails in the other modes (`[isr-kept]`,
//! `[kvm-init-fsgs-msr]`) and the lowest-priority checks that need
//! real PPR arbitration (lowest PPR wins, ties round-robin; `[kvm-vector-hashing]`).

#[macro_use]
mod common;

use irqvm::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::User;

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
/// The guests that need a VM option, and so a test of their own (below): `protected_aps` needs
/// `--protected-state-aps`, which only this mode takes (its expectation file says `-` for the
/// others, and their `every_guest_runs_in_*_mode` tests leave it out).
const WITH_OPTIONS: &[&str] = &["protected_aps"];
/// `syscall` and `syscall_smp` check the runs' SYSCALL counters too (`common::check_syscall`,
/// `common::check_syscall_smp`); `tlb_shootdown` reports its figures (`common::check_tlb_shootdown`).
const WITH_COUNTERS: &[&str] = &["syscall", "syscall_smp", "tlb_shootdown"];

#[test]
fn every_guest_runs_in_user_mode() {
    common::assert_every_guest_runs(
        MODE,
        STANDALONE,
        &[HOST_DRIVEN, WITH_OPTIONS, WITH_COUNTERS].concat(),
    );
}

/// Seed 004 end to end: see `common::check_protected_aps` and guests/protected_aps.c.
#[test]
fn protected_aps() {
    common::check_protected_aps();
}

/// Without `--protected-state-aps` the GHCB MSR is not irqvm's: RDMSR 0xC0010130 takes #GP (as
/// before the option existed), and the guest stops at its first check.
#[test]
fn protected_aps_without_the_option_sees_no_ghcb_msr() {
    let _one = common::exclusive();
    let run = common::run_guest("protected_aps", 2, MODE);
    let report = run.result.as_ref().expect("the VM runs");
    assert!(
        run.output
            .contains("FAIL: ghcb msr present: RDMSR 0xc0010130 took vector 13"),
        "{}",
        run.output
    );
    assert!(
        run.output.contains("DONE: 0 passed, 1 failed"),
        "{}",
        run.output
    );
    assert_eq!(report.exit.exit_status(), 3, "{}", run.output);
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

/// guests/irq_boundary.c's checks of a vector that a handler uncovers before its IRETQ: where the
/// handler's way out is its library stub's register restores (an EOI by xAPIC MMIO write, then
/// RET, POPs, ADD RSP and IRETQ), `user` mode runs that way out itself and injects right after
/// the IRETQ (`backend::epilogue`, counter `finished_returns`) instead of running the guest to a
/// breakpoint at the return address. The guest's checks (its registers, flags and RSP at that
/// boundary and after it, the boundary's RIP) pass; the counter shows the way out was run here for
/// at least the four checks made for it (three handlers that only EOI, one that fills every
/// register before its EOI), not only by the breakpoint the checks would pass with as well.
#[test]
fn irq_boundary_handlers_way_out_run_by_irqvm() {
    let _one = common::exclusive();
    let mut cfg = common::guest_config("irq_boundary", 1, MODE);
    let capture = irqvm::devices::SerialCapture::new();
    cfg.serial = irqvm::devices::SerialOutput::Capture(capture.clone());
    let vm = irqvm::vm::Vm::new(&cfg)
        .expect("VM")
        .start()
        .expect("start");
    let chip = vm.irqchip().clone();
    let report = vm.wait(Some(std::time::Duration::from_secs(120)));
    let output = capture.text();
    assert!(report.is_ok(), "{report:?}\n{output}");
    if let Err(problems) =
        common::expect::Expectations::load("irq_boundary").verify(MODE, 1, &output)
    {
        panic!("{problems}\n{output}");
    }
    let mut finished = None;
    chip.counters(&mut |vcpu, name, value| {
        if vcpu == Some(0) && name == "finished_returns" {
            finished = Some(value);
        }
    });
    let finished = finished.expect("vCPU 0 counts finished_returns");
    assert!(finished >= 4, "{finished} ways out run by irqvm\n{output}");
}
