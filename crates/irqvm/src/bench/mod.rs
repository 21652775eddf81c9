//! `irqvm bench`: how fast interrupt delivery is, in every irqchip mode of irqvm and under QEMU,
//! with the same guest binaries (`crates/irqvm/guests/bench_*.c`).
//!
//! One invocation runs, for each repeat, each peer (`runner::Peer`: every [`IrqchipMode`] of
//! irqvm, QEMU with KVM, QEMU with TCG) on the latency guest (`bench_lat`, 2 vCPUs), the AP
//! bring-up guest (`bench_boot`) at each vCPU count, and, irqvm only, the host-driven device
//! interrupt guest (`bench_irqhost`). Every VM is a child process measured the same way
//! (`runner.rs`). Figures are medians over the repeats with their spread; ratios are taken
//! against the fastest peer of the same invocation.

mod child;
mod parse;
mod plot;
mod report;
mod runner;
mod stats;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::ValueEnum;

use crate::irqchip::IrqchipMode;
use runner::{Peer, RunResult, RunSpec};

/// `irqvm bench` arguments.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A short run for CI: fewer iterations, one repeat, 1-2 vCPUs; QEMU is skipped if absent.
    #[arg(long)]
    pub quick: bool,
    /// Repeats of every run (default 3, 1 with --quick).
    #[arg(long, value_name = "N")]
    pub repeats: Option<u32>,
    /// Where the machine-readable results go.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "target/irqvm-bench/results.json"
    )]
    pub json: PathBuf,
    /// Also write DIR/benchmarks.md (its generated section) and the plots in DIR/bench/.
    #[arg(long, value_name = "DIR")]
    pub docs: Option<PathBuf>,
    /// Compare the irqvm modes only.
    #[arg(long)]
    pub no_qemu: bool,
    /// Internal: run one benchmark VM in this process (the parent's child).
    #[arg(long, hide = true, value_name = "KERNEL")]
    pub vm_child: Option<PathBuf>,
    #[arg(long, hide = true, default_value_t = 1)]
    pub child_cpus: u32,
    #[arg(long, hide = true, value_enum, default_value_t = IrqchipMode::Kernel)]
    pub child_irqchip: IrqchipMode,
    #[arg(long, hide = true, default_value = "")]
    pub child_cmdline: String,
    #[arg(long, hide = true)]
    pub child_host_driver: bool,
    #[arg(long, hide = true, default_value_t = 200)]
    pub child_pulses: u32,
    #[arg(
        long,
        hide = true,
        value_delimiter = ',',
        default_value = "1000,4000,16000"
    )]
    pub child_rates: Vec<u64>,
}

/// How much work a suite does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub repeats: u32,
    /// Iterations of each latency workload.
    pub iterations: u32,
    pub boot_cpus: Vec<u32>,
    pub rates: Vec<u64>,
    pub pulses: u32,
    pub timeout: Duration,
}

impl Plan {
    fn new(args: &BenchArgs) -> Self {
        if args.quick {
            Self {
                quick: true,
                repeats: args.repeats.unwrap_or(1).max(1),
                iterations: 20,
                boot_cpus: vec![1, 2],
                rates: vec![1000],
                pulses: 40,
                timeout: Duration::from_secs(40),
            }
        } else {
            Self {
                quick: false,
                repeats: args.repeats.unwrap_or(3).max(1),
                iterations: 100,
                boot_cpus: vec![1, 2, 4, 8, 16],
                rates: vec![1000, 4000, 16000],
                pulses: 200,
                timeout: Duration::from_secs(90),
            }
        }
    }
}

/// Which guest a run boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum RunKind {
    /// `bench_lat` on 2 vCPUs: every latency workload.
    Latency,
    /// `bench_boot` on this many vCPUs.
    Boot(u32),
    /// `bench_irqhost` (irqvm only).
    HostIrq,
}

/// One finished run.
pub struct Run {
    pub peer: Peer,
    pub kind: RunKind,
    pub repeat: u32,
    pub result: RunResult,
}

/// Everything one invocation measured.
pub struct Suite {
    pub plan: Plan,
    pub peers: Vec<Peer>,
    pub tsc_hz: f64,
    pub runs: Vec<Run>,
    pub notes: Vec<String>,
    pub command: String,
    pub elapsed: Duration,
}

/// Entry point of `irqvm bench`; returns the exit status.
pub fn main(args: &BenchArgs) -> i32 {
    if let Some(kernel) = &args.vm_child {
        let spec = child::ChildSpec {
            kernel: kernel.clone(),
            cpus: args.child_cpus,
            irqchip: args.child_irqchip,
            cmdline: args.child_cmdline.clone(),
            host_driver: args.child_host_driver,
            pulses: args.child_pulses,
            rates: args.child_rates.clone(),
        };
        return match child::main(spec) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("irqvm bench child: {e}");
                2
            }
        };
    }
    match run_suite(args) {
        Ok(suite) => finish(args, &suite),
        Err(e) => {
            eprintln!("irqvm bench: {e}");
            2
        }
    }
}

/// The install hint for QEMU.
pub const QEMU_HINT: &str =
    "install QEMU with `apt-get install -y qemu-system-x86` (Debian), or pass --no-qemu";

fn peers(
    args: &BenchArgs,
    notes: &mut Vec<String>,
) -> Result<(Vec<Peer>, Option<PathBuf>), String> {
    let mut peers: Vec<Peer> = IrqchipMode::value_variants()
        .iter()
        .map(|m| Peer::Irqvm(*m))
        .collect();
    if args.no_qemu {
        notes.push("QEMU peers left out (--no-qemu)".into());
        return Ok((peers, None));
    }
    match runner::find_qemu() {
        Some(q) => {
            peers.extend([Peer::QemuKvm, Peer::QemuTcg]);
            Ok((peers, Some(q)))
        }
        None if args.quick => {
            notes.push(format!(
                "QEMU not installed: QEMU peers skipped ({QEMU_HINT})"
            ));
            Ok((peers, None))
        }
        None => Err(format!(
            "the full benchmark compares against QEMU, which is not installed: {QEMU_HINT}"
        )),
    }
}

/// The host TSC rate, measured against the monotonic clock over 200 ms. Guest samples are
/// converted with it: under KVM and under TCG the guest TSC ticks at the host's rate.
fn host_tsc_hz() -> f64 {
    fn rdtsc() -> u64 {
        // SAFETY: RDTSC has no side effects; every x86-64 CPU has it.
        #[allow(unused_unsafe)]
        unsafe {
            std::arch::x86_64::_rdtsc()
        }
    }
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = (Instant::now(), rdtsc());
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn guest(name: &str) -> PathBuf {
    Path::new(crate::GUESTS_DIR).join(format!("{name}.elf"))
}

fn spec(plan: &Plan, peer: Peer, kind: RunKind) -> RunSpec {
    let n = plan.iterations;
    let (kernel, cpus, cmdline, host_driver) = match kind {
        RunKind::Latency => (guest("bench_lat"), 2, format!("n={n}"), false),
        RunKind::Boot(cpus) => (guest("bench_boot"), cpus, String::new(), false),
        RunKind::HostIrq => (guest("bench_irqhost"), 1, String::new(), true),
    };
    RunSpec {
        peer,
        kernel,
        cpus,
        cmdline,
        host_driver,
        timeout: plan.timeout,
        host_pulses: plan.pulses,
        host_rates: plan.rates.clone(),
    }
}

fn run_suite(args: &BenchArgs) -> Result<Suite, String> {
    let started = Instant::now();
    let plan = Plan::new(args);
    let mut notes = Vec::new();
    let (peers, qemu) = peers(args, &mut notes)?;
    let tsc_hz = host_tsc_hz();
    let mut kinds = vec![RunKind::Latency];
    kinds.extend(plan.boot_cpus.iter().map(|&n| RunKind::Boot(n)));
    kinds.push(RunKind::HostIrq);
    let mut runs = Vec::new();
    for repeat in 0..plan.repeats {
        // Peers interleaved within a repeat, so a slow phase of the host hits them alike.
        for &kind in &kinds {
            for &peer in &peers {
                if kind == RunKind::HostIrq && !peer.is_irqvm() {
                    continue;
                }
                let spec = spec(&plan, peer, kind);
                eprint!(
                    "irqvm bench: repeat {}/{} {} {kind:?} ... ",
                    repeat + 1,
                    plan.repeats,
                    peer.name()
                );
                let result = runner::run(&spec, qemu.as_deref())
                    .map_err(|e| format!("cannot run {}: {e}", peer.name()))?;
                eprintln!("{:.2} s", result.wall.as_secs_f64());
                runs.push(Run {
                    peer,
                    kind,
                    repeat,
                    result,
                });
            }
        }
    }
    Ok(Suite {
        plan,
        peers,
        tsc_hz,
        runs,
        notes,
        command: command_line(),
        elapsed: started.elapsed(),
    })
}

fn command_line() -> String {
    let mut words: Vec<String> = std::env::args().skip(1).collect();
    words.insert(0, "irqvm".into());
    words.join(" ")
}

/// Prints the tables, writes the JSON (and the docs), checks completion; the exit status is 1
/// if any workload did not complete or did not count what it sent.
fn finish(args: &BenchArgs, suite: &Suite) -> i32 {
    let summary = report::Summary::new(suite);
    println!("{}", summary.text());
    let problems = summary.problems();
    let mut status = 0;
    if let Err(e) = write_json(&args.json, &summary) {
        eprintln!("irqvm bench: cannot write {}: {e}", args.json.display());
        status = 2;
    } else {
        println!("results: {}", args.json.display());
    }
    if let Some(dir) = &args.docs {
        match report::write_docs(dir, &summary) {
            Ok(()) => println!("docs: {}", dir.join("benchmarks.md").display()),
            Err(e) => {
                eprintln!(
                    "irqvm bench: cannot write the docs in {}: {e}",
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
        for p in &problems {
            println!("PROBLEM: {p}");
        }
        1
    }
}

fn write_json(path: &Path, summary: &report::Summary) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(&summary.json()).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}
