//! Measures what guest exits cost on this host: a loop of N accesses, timed from VM start to
//! debug-exit, minus an empty loop of the same count.
//!
//!     cargo run --release -p irqvm --example exit_cost [N]

use std::time::Duration;

use irqvm::devices::SerialOutput;
use irqvm::loader::{CpuMode, RawImage};
use irqvm::vm::{Vm, VmConfig};

/// `mov esi, n; body; dec esi; jnz body; mov eax, 0; out 0xF4, eax`.
fn loop_guest(n: u32, body: &[u8]) -> Vec<u8> {
    let mut code = vec![0xBE];
    code.extend_from_slice(&n.to_le_bytes());
    code.extend_from_slice(body);
    code.push(0x4E); // dec esi
    let back = -((body.len() + 3) as i8 as i32) as i8;
    code.extend_from_slice(&[0x75, back as u8]); // jnz body
    code.extend_from_slice(&[0xB8, 0, 0, 0, 0, 0xE7, 0xF4]);
    code
}

fn run(code: Vec<u8>) -> Duration {
    let mut cfg = VmConfig::new(code, "bench");
    // The mode these figures were first measured in (the exits here are port and RAM accesses).
    cfg.irqchip = irqvm::IrqchipMode::Kernel;
    cfg.memory = 16 << 20;
    cfg.serial = SerialOutput::Discard;
    cfg.raw = Some(RawImage {
        load_addr: 0x10_0000,
        entry: 0x10_0000,
        mode: CpuMode::Protected32,
    });
    let report = Vm::new(&cfg)
        .unwrap()
        .run(Some(Duration::from_secs(120)))
        .unwrap();
    report.elapsed
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let baseline = run(loop_guest(n, &[]));
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "PIO write to an unclaimed port (exit to userspace)",
            vec![0xE6, 0x80],
        ),
        (
            "MMIO read of an unclaimed address (exit to userspace)",
            vec![0xA1, 0, 0, 0, 0xE0],
        ),
        ("CPUID (handled inside KVM)", vec![0x31, 0xC0, 0x0F, 0xA2]),
    ];
    println!("{n} iterations each; empty loop: {baseline:?}");
    for (what, body) in cases {
        let t = run(loop_guest(n, &body));
        let per = t.saturating_sub(baseline).as_nanos() / u128::from(n);
        println!("{what}: {per} ns per operation ({t:?} total)");
    }
}
