//! The guest test kernels on the `user` irqchip (every interrupt controller in userspace, from
//! the `irqchip` crate), on 1, 2 and 4 vCPUs. Checks the guests tag as host-limited in kernel
//! mode ([isr-kept], [tcg-apic-gap]: limits of KVM's in-kernel LAPIC here) must PASS here.

mod common;
#[path = "common/kvm_rules.rs"]
mod kvm_rules;

use common::{check_init_state, check_storm_with_host_line, GuestRun};
use irqvm::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::User;

fn run_on_1_2_4(name: &str) -> Vec<GuestRun> {
    common::run_on_1_2_4(name, MODE, None)
}

/// Every line `PASS: ... [tag]` the guests print for `tag` is there, and no such check failed.
fn assert_tagged_checks_pass(run: &GuestRun, tag: &str, at_least: usize) {
    let passed = run
        .output
        .lines()
        .filter(|l| l.starts_with("PASS: ") && l.contains(tag))
        .count();
    assert!(
        passed >= at_least,
        "expected {at_least} passing {tag} checks:\n{}",
        run.output
    );
}

#[test]
fn hello_passes() {
    run_on_1_2_4("hello");
}

#[test]
fn smp_boot_brings_every_ap_online() {
    for run in run_on_1_2_4("smp_boot").iter().skip(1) {
        assert!(
            run.output.contains("PASS: all cpus online"),
            "{}",
            run.output
        );
    }
}

#[test]
fn init_again_passes() {
    run_on_1_2_4("init_again");
}

/// SDM Table 10-1 from inside the guest: after INIT-SIPI the AP finds every register INIT
/// resets at its reset value (including IA32_EFER, the FS/GS bases as RDMSR reports them, and
/// KVM's clock MSR, which user mode clears itself) and every MSR, the TSC and the x87/SSE state
/// INIT keeps as it left them.
#[test]
fn init_state_resets_what_table_10_1_resets_and_keeps_the_rest() {
    check_init_state(
        MODE,
        None,
        &["PASS: init clears ia32_fs_base and ia32_gs_base [kvm-init-fsgs-msr]"],
    );
}

#[test]
fn ipi_passes_including_tcg_apic_gap_checks() {
    let runs = run_on_1_2_4("ipi");
    for run in runs.iter().skip(1) {
        assert_tagged_checks_pass(run, "[tcg-apic-gap]", 1);
    }
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
fn tpr_passes_including_isr_kept_checks() {
    for run in run_on_1_2_4("tpr") {
        assert_tagged_checks_pass(&run, "[isr-kept]", 4);
    }
}

#[test]
fn ioapic_passes_including_isr_kept_checks() {
    for run in run_on_1_2_4("ioapic") {
        assert_tagged_checks_pass(&run, "[isr-kept]", 2);
    }
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
fn demo_passes() {
    run_on_1_2_4("demo");
}

#[test]
fn storm_with_host_device_lines_counts_exactly() {
    check_storm_with_host_line(MODE);
}

/// `apic_base` (IA32_APIC_BASE, SDM §11.4.3-§11.4.5, §11.12.5) passes whole: relocation, #GP
/// on illegal writes, x2APIC transitions, and global disable/enable including the power-up
/// register state KVM's in-kernel LAPIC does not load (`[kvm-apic-en-keeps-regs]`) and
/// CPUID.1:EDX[9] following EN.
#[test]
fn apic_base_passes_including_kvm_apic_en_keeps_regs_checks() {
    for run in run_on_1_2_4("apic_base") {
        assert_tagged_checks_pass(&run, "[kvm-apic-en-keeps-regs]", 6);
        assert_tagged_checks_pass(&run, "[tcg-apic-gap]", 12);
    }
}

/// MSIs from a host thread (`RunningVm::signal_msi`): see `common::check_msi_from_host`.
#[test]
fn msi_from_host_reaches_the_addressed_cpu_exactly_once() {
    common::check_msi_from_host(MODE);
}

/// Issue 10: the guests that pin three of KVM's rules pass whole, with every check that their vCPU
/// count allows passing (`kvm_rules::required_passes`).
fn run_kvm_rule_guest(name: &str) {
    for (run, cpus) in common::run_on_1_2_4(name, MODE, None).iter().zip([1, 2, 4]) {
        kvm_rules::assert_required_passes(name, cpus, &run.output);
    }
}

/// IA32_APIC_BASE: a bit at or above MAXPHYADDR (CPUID 80000008H) or a reserved low bit raises
/// #GP and changes nothing, on the BSP and an AP, and the VM runs on (SDM §11.4.4).
#[test]
fn apic_base_rsvd_bits_at_or_above_maxphyaddr_raise_gp() {
    run_kvm_rule_guest("apic_base_rsvd");
}

/// LVT timer mode changes as KVM's `apic_update_lvtt`: one-shot <-> periodic keeps TMICT and
/// the running count; into or out of TSC-deadline mode stops the timer and clears TMICT.
#[test]
fn timer_mode_switches_follow_kvm() {
    run_kvm_rule_guest("timer_mode");
}

/// NMI queueing as KVM's `process_nmi`: two pending while none is in service, one held while
/// one is; two CPUs sending CPU 0 an NMI at the same moment make it take exactly two.
#[test]
fn nmi_queue_follows_kvm_process_nmi() {
    run_kvm_rule_guest("nmi_queue");
}
