//! Exits per guest run in `kernel` and `split` mode, for the comparison in
//! docs/irqchip-modes.md: each named guest (default: pic, ioapic, once, storm) on N vCPUs
//! (default 2), KVM_RUN returns summed over the vCPUs by kind.
//!
//!     cargo run --release -p irqvm --example split_exits [CPUS] [GUEST...]

use std::time::Duration;

use irqvm::devices::SerialOutput;
use irqvm::vm::{Vm, VmConfig};
use irqvm::IrqchipMode;

fn main() {
    let mut args = std::env::args().skip(1);
    let cpus: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let mut guests: Vec<String> = args.collect();
    if guests.is_empty() {
        guests = ["pic", "ioapic", "once", "storm"]
            .map(String::from)
            .to_vec();
    }
    println!("guest   mode    runs  eintr   pio  mmio  other   hlt  elapsed");
    for guest in &guests {
        let path = format!("{}/{guest}.elf", irqvm::GUESTS_DIR);
        let kernel = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        for mode in [IrqchipMode::Kernel, IrqchipMode::Split] {
            let mut cfg = VmConfig::new(kernel.clone(), &format!("{guest}.elf"));
            cfg.cpus = cpus;
            cfg.irqchip = mode;
            cfg.serial = SerialOutput::Discard;
            let report = Vm::new(&cfg)
                .unwrap()
                .run(Some(Duration::from_secs(60)))
                .unwrap();
            let sum = |f: fn(&irqvm::vcpu::VcpuStatsSnapshot) -> u64| -> u64 {
                report.vcpus.iter().map(f).sum()
            };
            println!(
                "{guest:7} {mode:7} {:5} {:6} {:5} {:5} {:6} {:5} {:?}",
                sum(|s| s.kvm_runs),
                sum(|s| s.eintr_returns),
                sum(|s| s.pio_exits),
                sum(|s| s.mmio_exits),
                sum(|s| s.other_exits),
                sum(|s| s.hlt_exits),
                report.elapsed,
                mode = format!("{mode:?}").to_lowercase(),
            );
        }
    }
}
