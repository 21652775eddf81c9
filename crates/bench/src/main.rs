//! `irqvm-bench`: how fast interrupt delivery is, in every irqchip mode of irqvm and under QEMU,
//! with the same guest binaries (`crates/irqvm/guests/bench_*.c`).
//!
//! One invocation runs, for each repeat, each peer ([`runner::Peer`]: every `IrqchipMode` of
//! irqvm, QEMU with KVM, QEMU with TCG) on the latency guest (`bench_lat`, 2 vCPUs), the AP
//! bring-up guest (`bench_boot`) at each vCPU count, the all-vCPU IPI guest (`bench_ipi`: storm
//! and broadcast) at each of its vCPU counts, and, irqvm only, the host-driven device interrupt
//! guest (`bench_irqhost`). Every VM is a child process measured the same way
//! (`runner.rs`); an irqvm child is this binary again (`--vm-child`), running the VM in process
//! through the irqvm library (`child.rs`). Figures are medians over the repeats with their
//! spread; ratios are taken against the fastest peer of the same invocation.
//!
//! Modules, each depending only on those listed before it: [`stats`], [`parse`], [`cli`],
//! [`perfstat`], [`runner`], [`child`], [`suite`], [`summary`], [`plot`], [`report`].

mod child;
mod cli;
mod floor;
mod parse;
mod perfstat;
mod plot;
mod report;
mod runner;
mod stats;
mod suite;
mod summary;

use std::path::Path;

use clap::Parser;

use cli::Args;
use summary::Summary;

fn main() {
    std::process::exit(run(&Args::parse()));
}

/// Runs the suite, or with `--vm-child` one VM of it; returns the exit status.
fn run(args: &Args) -> i32 {
    if let Some(kernel) = &args.vm_child {
        // The child stands for the irqvm binary (its CPU time and peak RSS are the VMM's in the
        // tables): it sets up logging as `irqvm` does, to stderr (discarded by the parent).
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("IRQVM_LOG"))
            .with_writer(std::io::stderr)
            .init();
        let spec = child::ChildSpec {
            kernel: kernel.clone(),
            cpus: args.child_cpus,
            timeout: std::time::Duration::from_secs(args.child_timeout),
            irqchip: args.child_irqchip,
            cmdline: args.child_cmdline.clone(),
            host_driver: args.child_host_driver,
            exact_irq_boundaries: !args.child_inexact_boundaries,
            pulses: args.child_pulses,
            rates: args.child_rates.clone(),
        };
        return match child::main(spec) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("irqvm-bench child: {e}");
                2
            }
        };
    }
    match suite::run_suite(args) {
        Ok(suite) => finish(args, &suite),
        Err(e) => {
            eprintln!("irqvm-bench: {e}");
            2
        }
    }
}

/// Prints the tables, writes the JSON (and the docs), checks completion; the exit status is 1
/// if any workload did not complete or did not count what it sent.
fn finish(args: &Args, suite: &suite::Suite) -> i32 {
    let summary = Summary::new(suite);
    println!("{}", summary.text());
    let problems = summary.problems();
    let mut status = 0;
    if let Err(e) = write_json(&args.json, &summary) {
        eprintln!("irqvm-bench: cannot write {}: {e}", args.json.display());
        status = 2;
    } else {
        println!("results: {}", args.json.display());
    }
    if let Some(dir) = &args.docs {
        match report::write_docs(dir, &summary) {
            Ok(()) => println!("docs: {}", dir.join("benchmarks.md").display()),
            Err(e) => {
                eprintln!(
                    "irqvm-bench: cannot write the docs in {}: {e}",
                    dir.display()
                );
                status = 2;
            }
        }
    }
    if problems.is_empty() {
        println!("bench: every workload completed and counted what it sent");
        status
    } else {
        for p in problems {
            println!("PROBLEM: {p}");
        }
        1
    }
}

fn write_json(path: &Path, summary: &Summary) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&summary.json()).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}
