//! The guest test kernels on the `kernel` irqchip (KVM's in-kernel PIC, IOAPIC and LAPICs), on
//! 1, 2 and 4 vCPUs: every guest prints PASS/FAIL lines and ends with debug-exit 0.

mod common;

use common::run_guest;
use irqvm::irqchip::IrqchipMode;

fn run_on_1_2_4(name: &str) {
    for cpus in [1, 2, 4] {
        let run = run_guest(name, cpus, IrqchipMode::Kernel);
        run.assert_all_passed(&format!("{name} on {cpus} vCPU(s), kernel irqchip"));
    }
}

#[test]
fn hello_passes() {
    run_on_1_2_4("hello");
}

#[test]
fn hello_reports_cpu_count_and_ram_from_fw_cfg() {
    let run = run_guest("hello", 2, IrqchipMode::Kernel);
    assert!(
        run.output
            .contains("2 CPU(s), fw_cfg present, RAM 128 MiB, multiboot magic 2badb002"),
        "{}",
        run.output
    );
}

#[test]
fn smp_boot_brings_every_ap_online() {
    run_on_1_2_4("smp_boot");
    for cpus in [2, 4] {
        let run = run_guest("smp_boot", cpus, IrqchipMode::Kernel);
        assert!(
            run.output.contains("PASS: all cpus online"),
            "{}",
            run.output
        );
        for ap in 1..cpus {
            assert!(
                run.output.contains(&format!("PASS: cpu {ap} online")),
                "{}",
                run.output
            );
        }
    }
}

#[test]
fn init_again_passes() {
    run_on_1_2_4("init_again");
}

#[test]
fn demo_runs_on_four_vcpus() {
    let run = common::run_vm(irqvm::cli::demo_config());
    run.assert_all_passed("demo");
}
