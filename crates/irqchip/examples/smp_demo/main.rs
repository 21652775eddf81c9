//! `cargo run -p irqchip --example smp_demo [VCPUS] [ROUNDS]`: four simulated CPUs (by default)
//! start up with INIT-SIPI-SIPI and pass an IPI token around, all through the userspace APIC
//! model, one host thread per vCPU.

mod sim;

fn main() {
    let mut args = std::env::args().skip(1);
    let vcpus = parse(args.next(), 4, "VCPUS").clamp(1, sim::MAX_VCPUS);
    let rounds = parse(args.next(), 2, "ROUNDS") as u64;
    let report = sim::run(vcpus, rounds, true);
    let all_started = report.starts.iter().skip(1).all(|&n| n == 1);
    if !all_started || report.hellos as usize != vcpus - 1 {
        eprintln!("FAIL: starts {:?}, hellos {}", report.starts, report.hellos);
        std::process::exit(1);
    }
    println!(
        "PASS: {vcpus} CPUs online in order {:?}, token taken {:?} times per CPU ({} log lines)",
        report.online_order,
        report.tokens,
        report.log.len()
    );
}

fn parse(arg: Option<String>, default: usize, what: &str) -> usize {
    match arg {
        None => default,
        Some(text) => text.parse().unwrap_or_else(|_| {
            eprintln!("{what} must be a number, got {text:?}");
            std::process::exit(2);
        }),
    }
}
