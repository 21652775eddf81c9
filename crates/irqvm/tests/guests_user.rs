//! The guest test kernels on the `user` irqchip (every interrupt controller in userspace, from
//! the `irqchip` crate), on 1, 2 and 4 vCPUs. Checks the guests tag as host-limited in kernel
//! mode ([isr-kept], [tcg-apic-gap]: limits of KVM's in-kernel LAPIC here) must PASS here.

mod common;

use std::sync::{Mutex, MutexGuard};

use common::{assert_storm_counts_exact, run_guest, run_storm_with_host_line, GuestRun};
use irqvm::irqchip::IrqchipMode;

const MODE: IrqchipMode = IrqchipMode::User;

/// One guest VM at a time: the guests time themselves with the TSC (a 1 ms APIC count must
/// still be running at the next register read), and a dozen VMs on 2 shared cores would starve
/// their vCPU threads for milliseconds.
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

fn run_on_1_2_4(name: &str) -> Vec<GuestRun> {
    [1, 2, 4]
        .into_iter()
        .map(|cpus| {
            let _one = exclusive();
            let run = run_guest(name, cpus, MODE);
            run.assert_all_passed(&format!("{name} on {cpus} vCPU(s), user irqchip"));
            run
        })
        .collect()
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

/// The checks of `init_state` that must PASS (not SKIP) on this host in every mode.
const INIT_STATE_CHECKS: &[&str] = &[
    "PASS: init clears the general registers",
    "PASS: init loads edx with the cpuid signature",
    "PASS: init loads eflags 2",
    "PASS: init cr0 is et with cd and nw kept [tcg-init-cr0]",
    "PASS: init clears cr2 cr3 cr4",
    "PASS: init clears efer",
    "PASS: init and sipi load the selectors",
    "PASS: init clears the fs and gs bases",
    "PASS: init loads gdtr and idtr base 0 limit ffff",
    "PASS: init loads the debug registers",
    "PASS: init clears tr and ldtr",
    "PASS: init keeps ia32_sysenter_cs",
    "PASS: init keeps ia32_star",
    "PASS: init keeps ia32_lstar",
    "PASS: init keeps ia32_kernel_gs_base",
    "PASS: init keeps ia32_pat",
    "PASS: init keeps the tsc running",
    "PASS: init keeps the x87 control word",
    "PASS: init keeps mxcsr",
    "PASS: init keeps xmm0",
    "PASS: init disables the kvm clock msr",
];

/// SDM Table 10-1 from inside the guest: after INIT-SIPI the AP finds every register INIT
/// resets at its reset value (including IA32_EFER, the FS/GS bases as RDMSR reports them, and
/// KVM's clock MSR, which user mode clears itself) and every MSR, the TSC and the x87/SSE state
/// INIT keeps as it left them.
#[test]
fn init_state_resets_what_table_10_1_resets_and_keeps_the_rest() {
    for cpus in [2, 4] {
        let _one = exclusive();
        let run = run_guest("init_state", cpus, MODE);
        run.assert_all_passed(&format!("init_state on {cpus} vCPUs, user irqchip"));
        for line in INIT_STATE_CHECKS
            .iter()
            .chain(&["PASS: init clears ia32_fs_base and ia32_gs_base [kvm-init-fsgs-msr]"])
        {
            assert!(run.output.contains(line), "no {line:?}:\n{}", run.output);
        }
    }
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

/// The storm guest while a host thread pulses IOAPIC line 10 (storm.c's `host_link` handshake:
/// one host edge outstanding at a time, none after the guest closed the window): every IPI sent
/// is received exactly once, and the guest counts exactly the device interrupts raised, the
/// host's pulses of line 10 and its own 20 of line 11.
#[test]
fn storm_with_host_device_lines_counts_exactly() {
    for cpus in [2, 4] {
        let _one = exclusive();
        let (run, pulses) = run_storm_with_host_line(MODE, cpus);
        assert_storm_counts_exact(
            &run,
            cpus,
            pulses,
            &format!("storm, host line, {cpus} vCPUs, user"),
        );
    }
}
