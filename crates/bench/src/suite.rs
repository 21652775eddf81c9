//! One invocation of the suite: what it runs ([`Plan`]), in which order, and what it measured
//! ([`Suite`]). Every VM is a child process measured the same way (`runner.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use irqvm::IrqchipMode;

use crate::cli::Args;
use crate::runner::{self, Peer, RunResult, RunSpec};

/// How much work a suite does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub quick: bool,
    pub repeats: u32,
    /// Iterations of each latency workload.
    pub iterations: u32,
    pub boot_cpus: Vec<u32>,
    /// The large vCPU counts of `boot` (`--large`), run in the first repeat only.
    pub large_boot_cpus: Vec<u32>,
    /// `--boot-only`: the `boot` workload and nothing else.
    pub boot_only: bool,
    /// vCPU counts of the all-vCPU IPI guest (`bench_ipi`).
    pub ipi_cpus: Vec<u32>,
    pub rates: Vec<u64>,
    pub pulses: u32,
    pub timeout: Duration,
}

impl Plan {
    pub fn new(args: &Args) -> Self {
        let mut plan = Self::sized(args);
        if args.large {
            plan.large_boot_cpus = LARGE_BOOT_CPUS.to_vec();
        }
        plan.boot_only = args.boot_only;
        plan
    }

    fn sized(args: &Args) -> Self {
        if args.quick {
            Self {
                quick: true,
                repeats: args.repeats.unwrap_or(1).max(1),
                iterations: 20,
                boot_cpus: vec![1, 2],
                large_boot_cpus: Vec::new(),
                boot_only: false,
                ipi_cpus: vec![2],
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
                large_boot_cpus: Vec::new(),
                boot_only: false,
                ipi_cpus: vec![2, 4, 8, 16],
                rates: vec![1000, 4000, 16000],
                pulses: 200,
                timeout: Duration::from_secs(90),
            }
        }
    }
}

/// `--large`: the AP bring-up counts past 16, up to KVM's 1024 (x2APIC IDs past 254 from 255 on).
pub const LARGE_BOOT_CPUS: [u32; 3] = [64, 255, 1024];

/// How long a run may take: the plan's timeout, and for `boot` on many vCPUs 0.3 s more per
/// vCPU (the guest starts APs one after another; at 1024 vCPUs one AP takes tens of ms here).
fn run_timeout(plan: &Plan, kind: RunKind) -> Duration {
    match kind {
        RunKind::Boot(n) => plan.timeout + Duration::from_millis(300) * n,
        _ => plan.timeout,
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
    /// `bench_ipi` on this many vCPUs: the many-to-one storm and the broadcast.
    Ipi(u32),
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
    /// The host's load averages (`/proc/loadavg`: 1, 5, 15 min) when the suite started and ended.
    pub load_start: String,
    pub load_end: String,
}

/// The 1, 5 and 15 minute load averages of the host, or "unknown".
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The install hint for QEMU.
pub const QEMU_HINT: &str =
    "install QEMU with `apt-get install -y qemu-system-x86` (Debian), or pass --no-qemu";

fn peers(args: &Args, notes: &mut Vec<String>) -> Result<(Vec<Peer>, Option<PathBuf>), String> {
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
    // A clock reading and a TSC reading taken together: of five tries, the one whose clock
    // readings around the RDTSC are closest (on a loaded host the thread may lose its CPU
    // between the two, which skewed the rate by 6% at load average 27).
    fn stamp() -> (Instant, u64) {
        (0..5)
            .map(|_| {
                let a = Instant::now();
                let c = rdtsc();
                let b = Instant::now();
                (b - a, a + (b - a) / 2, c)
            })
            .min_by_key(|s| s.0)
            .map(|(_, t, c)| (t, c))
            .unwrap_or_else(|| (Instant::now(), rdtsc()))
    }
    let (t0, c0) = stamp();
    std::thread::sleep(Duration::from_millis(200));
    let (t1, c1) = stamp();
    (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
}

fn guest(name: &str) -> PathBuf {
    Path::new(irqvm::GUESTS_DIR).join(format!("{name}.elf"))
}

fn spec(plan: &Plan, peer: Peer, kind: RunKind) -> RunSpec {
    let n = plan.iterations;
    let (kernel, cpus, cmdline, host_driver) = match kind {
        RunKind::Latency => (guest("bench_lat"), 2, format!("n={n}"), false),
        RunKind::Boot(cpus) => (guest("bench_boot"), cpus, String::new(), false),
        RunKind::HostIrq => (guest("bench_irqhost"), 1, String::new(), true),
        RunKind::Ipi(cpus) => (guest("bench_ipi"), cpus, format!("n={n}"), false),
    };
    RunSpec {
        peer,
        kernel,
        cpus,
        cmdline,
        host_driver,
        timeout: run_timeout(plan, kind),
        host_pulses: plan.pulses,
        host_rates: plan.rates.clone(),
        perf: !matches!(kind, RunKind::Boot(_)),
    }
}

pub fn run_suite(args: &Args) -> Result<Suite, String> {
    let started = Instant::now();
    let load_start = load_average();
    let plan = Plan::new(args);
    let mut notes = Vec::new();
    let (peers, qemu) = peers(args, &mut notes)?;
    let tsc_hz = host_tsc_hz();
    let kinds = kinds(&plan);
    let mut runs = Vec::new();
    for repeat in 0..plan.repeats {
        // Peers interleaved within a repeat, so a slow phase of the host hits them alike.
        for &kind in &kinds {
            if matches!(kind, RunKind::Boot(n) if plan.large_boot_cpus.contains(&n)) && repeat > 0 {
                continue;
            }
            for &peer in &peers {
                if kind == RunKind::HostIrq && !peer.is_irqvm() {
                    continue;
                }
                if let RunKind::Boot(n) = kind {
                    if n > peer.max_cpus() {
                        if repeat == 0 {
                            notes.push(format!(
                                "{} not run on {n} vCPUs (its limit here: {})",
                                peer.name(),
                                peer.max_cpus()
                            ));
                        }
                        continue;
                    }
                }
                let spec = spec(&plan, peer, kind);
                eprint!(
                    "irqvm-bench: repeat {}/{} {} {kind:?} ... ",
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
        load_start,
        load_end: load_average(),
    })
}

/// What the plan runs, in order.
fn kinds(plan: &Plan) -> Vec<RunKind> {
    let boot = plan
        .boot_cpus
        .iter()
        .chain(&plan.large_boot_cpus)
        .map(|&n| RunKind::Boot(n));
    if plan.boot_only {
        return boot.collect();
    }
    let mut kinds = vec![RunKind::Latency];
    kinds.extend(boot);
    kinds.push(RunKind::HostIrq);
    kinds.extend(plan.ipi_cpus.iter().map(|&n| RunKind::Ipi(n)));
    kinds
}

fn command_line() -> String {
    let mut words: Vec<String> = std::env::args().skip(1).collect();
    words.insert(0, "irqvm-bench".into());
    words.join(" ")
}
