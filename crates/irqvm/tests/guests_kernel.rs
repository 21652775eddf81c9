//! The guest test kernels on the `kernel` irqchip (KVM's in-kernel PIC, IOAPIC and LAPICs), on
//! 1, 2 and 4 vCPUs: every guest prints PASS/FAIL lines and ends with debug-exit 0.
//!
//! Checks a guest tags `[isr-kept]` need a delivered vector to stay in the LAPIC's ISR until its
//! EOI; KVM's in-kernel LAPIC on this host does not keep it (docs/kvm-facts.md, "KVM's own in-kernel
//! LAPIC here"), so in kernel mode those checks may fail, and only those.

mod common;

use common::{check_init_state, check_storm_with_host_line, run_guest};
use irqvm::irqchip::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::Kernel;

fn run_on_1_2_4(name: &str) {
    common::run_on_1_2_4(name, MODE, None);
}

fn run_on_1_2_4_except(name: &str, host_limit: &str) {
    common::run_on_1_2_4(name, MODE, Some(host_limit));
}

#[test]
fn hello_passes() {
    run_on_1_2_4("hello");
}

#[test]
fn hello_reports_cpu_count_and_ram_from_fw_cfg() {
    let run = run_guest("hello", 2, MODE);
    assert!(
        run.output
            .contains("2 CPU(s), fw_cfg present, RAM 128 MiB, multiboot magic 2badb002"),
        "{}",
        run.output
    );
}

#[test]
fn smp_boot_brings_every_ap_online() {
    for cpus in [1, 2, 4] {
        let run = run_guest("smp_boot", cpus, MODE);
        run.assert_all_passed(&format!("smp_boot on {cpus} vCPU(s)"));
        if cpus > 1 {
            assert!(
                run.output.contains("PASS: all cpus online"),
                "{}",
                run.output
            );
        }
        for ap in 1..cpus {
            let line = format!("PASS: cpu {ap} online");
            assert!(run.output.contains(&line), "{}", run.output);
        }
    }
}

#[test]
fn init_again_passes() {
    run_on_1_2_4("init_again");
}

/// `init_state` with KVM doing INIT: every check passes except RDMSR of IA32_FS_BASE /
/// IA32_GS_BASE, which kvm_pvm leaves at the old values although memory accesses use base 0
/// (`[kvm-init-fsgs-msr]`, a host limit; user mode, which loads the bases itself, passes it).
#[test]
fn init_state_passes_except_kvm_init_fsgs_msr_host_limit() {
    check_init_state(MODE, Some("kvm-init-fsgs-msr"), &[]);
}

#[test]
fn ipi_passes() {
    run_on_1_2_4("ipi");
}

#[test]
fn x2apic_passes() {
    run_on_1_2_4("x2apic");
}

#[test]
fn timer_passes() {
    run_on_1_2_4("timer");
}

#[test]
fn pic_passes() {
    run_on_1_2_4("pic");
}

#[test]
fn storm_passes() {
    run_on_1_2_4("storm");
}

#[test]
fn tpr_passes_except_isr_kept_checks_host_limit_of_kernel_lapic() {
    run_on_1_2_4_except("tpr", "isr-kept");
}

#[test]
fn ioapic_passes_except_isr_kept_checks_host_limit_of_kernel_lapic() {
    run_on_1_2_4_except("ioapic", "isr-kept");
}

#[test]
fn demo_runs_on_four_vcpus() {
    let run = common::run_vm(irqvm::cli::demo_config());
    run.assert_all_passed("demo");
    for cpu in 0..4 {
        assert!(
            run.output.contains(&format!("CPU {cpu} online")),
            "{}",
            run.output
        );
    }
}

#[test]
fn once_passes_except_isr_kept_checks_host_limit_of_kernel_lapic() {
    run_on_1_2_4_except("once", "isr-kept");
}

/// The storm guest while a host thread pulses IOAPIC line 10 through KVM_IRQ_LINE (storm.c's
/// `host_link` handshake): KVM's IOAPIC and LAPICs deliver exactly the device interrupts raised
/// and every IPI once.
#[test]
fn storm_with_host_device_lines_counts_exactly() {
    check_storm_with_host_line(MODE);
}

/// `apic_base` with KVM's LAPIC (kernel mode): relocation, the #GP checks, the x2APIC transitions and
/// CPUID.1:EDX[9] pass; after EN = 0 -> 1 KVM keeps SVR, TPR, LDR, DFR and the LVTs as they were
/// instead of loading the power-up state (SDM §11.4.3), so only the checks tagged
/// `[kvm-apic-en-keeps-regs]` may fail (a host limit; user mode passes them).
#[test]
fn apic_base_passes_except_kvm_apic_en_keeps_regs_host_limit() {
    run_on_1_2_4_except("apic_base", "kvm-apic-en-keeps-regs");
}

/// MSIs from a host thread (`RunningVm::signal_msi`): see `common::check_msi_from_host`.
#[test]
fn msi_from_host_reaches_the_addressed_cpu_exactly_once() {
    common::check_msi_from_host(MODE);
}
