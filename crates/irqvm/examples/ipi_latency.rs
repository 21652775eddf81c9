//! IPI delivery cost in each irqchip mode, with the `latency` guest on 2 vCPUs: the guest measures
//! ICR write -> handler entry (TSC) for a halted and a spinning target; this program samples the
//! vCPUs' exit counters at the guest's `LAT: begin/end` markers and prints exits per delivered IPI.
//!
//! `cargo run --release -p irqvm --example ipi_latency`. Numbers are for orders of magnitude only.

use std::time::{Duration, Instant};

use irqvm::devices::{SerialCapture, SerialOutput};
use irqvm::vcpu::VcpuStatsSnapshot;
use irqvm::vm::{RunningVm, Vm, VmConfig};
use irqvm::IrqchipMode;

const ROUNDS: u64 = 200;
const CASES: [&str; 2] = ["ipi to halted cpu", "ipi to spinning cpu"];

fn exits(s: &VcpuStatsSnapshot) -> u64 {
    s.kvm_runs
}

fn wait_for(capture: &SerialCapture, marker: &str) -> bool {
    let start = Instant::now();
    while !capture.text().contains(marker) {
        if start.elapsed() > Duration::from_secs(60) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

fn sample(vm: &RunningVm) -> [VcpuStatsSnapshot; 2] {
    [vm.vcpu(0).stats.snapshot(), vm.vcpu(1).stats.snapshot()]
}

fn main() {
    let kernel = std::fs::read(format!("{}/latency.elf", irqvm::GUESTS_DIR)).unwrap();
    for mode in [IrqchipMode::Kernel, IrqchipMode::User] {
        let capture = SerialCapture::new();
        let mut cfg = VmConfig::new(kernel.clone(), "latency.elf");
        cfg.cpus = 2;
        cfg.irqchip = mode;
        cfg.serial = SerialOutput::Capture(capture.clone());
        let vm = Vm::new(&cfg).unwrap().start().unwrap();
        let mut per_case = Vec::new();
        for case in CASES {
            if !wait_for(&capture, &format!("LAT: begin {case}")) {
                break;
            }
            let before = sample(&vm);
            if !wait_for(&capture, &format!("LAT: end {case}")) {
                break;
            }
            let after = sample(&vm);
            per_case.push((case, before, after));
        }
        let report = vm.wait(Some(Duration::from_secs(60)));
        println!("== {mode:?} irqchip ({:?})", report.map(|r| r.exit));
        for line in capture.text().lines().filter(|l| l.starts_with("LAT: ipi")) {
            println!("  {line}");
        }
        for (case, before, after) in per_case {
            let sender = exits(&after[0]) - exits(&before[0]);
            let target = exits(&after[1]) - exits(&before[1]);
            let kicks = after[1].eintr_returns - before[1].eintr_returns;
            let blocks = after[1].blocks - before[1].blocks;
            println!(
                "  {case}: KVM_RUN returns per IPI: sender {:.1}, target {:.1} (EINTR {:.1}, blocks {:.1})",
                sender as f64 / ROUNDS as f64,
                target as f64 / ROUNDS as f64,
                kicks as f64 / ROUNDS as f64,
                blocks as f64 / ROUNDS as f64,
            );
        }
    }
}
