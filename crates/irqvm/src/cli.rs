//! Command line: `irqvm run --kernel FILE ...`, `irqvm restore ...`, `irqvm fuzz-guest ...`,
//! `irqvm diff-guest ...`, `irqvm trace report ...`, and `irqvm` alone for the built-in demo.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::devices::SerialOutput;
use crate::memory;
use crate::seccomp::{Role, ThreadFilter};
use crate::vm::{RunReport, Vm, VmConfig, VmError};
use crate::IrqchipMode;

/// The built-in demo guest: four CPUs come online and exchange IPIs.
pub static DEMO_GUEST: &[u8] = include_bytes!(concat!(env!("IRQVM_GUESTS_DIR"), "/demo.elf"));
/// vCPUs of the built-in demo.
pub const DEMO_CPUS: u32 = 4;

#[derive(Debug, Parser)]
#[command(
    name = "irqvm",
    version,
    about = "A VMM on KVM with the interrupt controllers in userspace",
    long_about = "A VMM on KVM. Without a subcommand it runs the built-in demo guest on 4 vCPUs. \
                  The serial port is on stdio; the exit status follows the guest's isa-debug-exit \
                  write v as (v << 1) | 1. The benchmark suite is its own binary: \
                  `cargo run --release -p irqvm-bench -- --help`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel: multiboot v1 (ELF32, ELF64 with a 32-bit entry, a.out kludge), plain ELF64,
    /// or a raw binary (--raw-at).
    Run(RunArgs),
    /// Restore a snapshot taken with the control API's `vm.snapshot` and run it, in any irqchip
    /// mode (by default the one it was taken in); or receive a live migration (--incoming); or,
    /// with --api-sock alone, wait for `PUT /api/v1/vm.restore`.
    Restore(RestoreArgs),
    /// Run the hostile-guest fuzzer (guests/fuzz.c) seed after seed in every irqchip mode and on
    /// 1, 2 and 4 vCPUs (or those given), each run under a watchdog; stops at the first failing
    /// seed and prints the command that replays it.
    FuzzGuest(FuzzArgs),
    /// Run the differential guest (guests/regdiff.c) seed after seed in `kernel` mode, KVM's
    /// interrupt controllers, and in `user` and `split` mode, and compare: each mode must print
    /// the same transcript of register reads. Stops at the first difference and names the
    /// registers that differ.
    DiffGuest(DiffArgs),
    /// Read a flight-recorder trace (`run --trace FILE`, or the API's trace.start/stop).
    #[command(subcommand)]
    Trace(TraceCommand),
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Print per-vector and per-source latency percentiles (post to injection, injection to
    /// EOI) and optionally draw a window of the timeline as SVG.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The trace file (Chrome Trace Event JSON written by irqvm).
    pub file: PathBuf,
    /// Draw the timeline of the window into this SVG file.
    #[arg(long, value_name = "OUT.svg")]
    pub svg: Option<PathBuf>,
    /// Start of the SVG's window, in µs since the VM started (default: the first event).
    #[arg(long, value_name = "US")]
    pub from: Option<f64>,
    /// End of the SVG's window, in µs since the VM started (default: the last event).
    #[arg(long, value_name = "US")]
    pub to: Option<f64>,
    /// Centre the SVG's window on the first interrupt of this vector (hex with 0x, or decimal)
    /// posted after --from that was injected and EOIed: from a little before its post to a
    /// little after its EOI.
    #[arg(long, value_name = "VECTOR", value_parser = parse_vector)]
    pub focus: Option<u8>,
}

fn parse_vector(text: &str) -> Result<u8, String> {
    parse_address(text)
        .and_then(|v| u8::try_from(v).map_err(|_| format!("'{text}' is not a vector")))
}

// fuzz-guest shares `run`'s flag (`ExactIrqBoundaries`) but keeps its own one-line help.
#[derive(Debug, clap::Args)]
#[command(mut_arg("exact_irq_boundaries", |arg| arg.help("As `irqvm run --exact-irq-boundaries`")))]
pub struct FuzzArgs {
    #[command(flatten)]
    pub seeds: SeedArgs,
    /// Only this irqchip mode (default: user, split and kernel).
    #[arg(long, value_enum)]
    pub irqchip: Option<IrqchipMode>,
    /// Only this vCPU count (default: 1, 2 and 4).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Operations per vCPU in each run.
    #[arg(long, value_name = "N", default_value_t = crate::fuzzguest::DEFAULT_OPS)]
    pub ops: u32,
    #[command(flatten)]
    pub boundaries: ExactIrqBoundaries,
}

/// The seeds a guest campaign (`fuzz-guest`, `diff-guest`) runs.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// Keep running seeds for this many seconds (without it: one seed, in every mode asked for).
    #[arg(long, value_name = "N")]
    pub seconds: Option<u64>,
    /// The first seed (default: from the clock); later ones count up from it.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
}

impl SeedArgs {
    fn first_seed(&self) -> u64 {
        self.seed.unwrap_or_else(crate::fuzzguest::clock_seed)
    }

    fn duration(&self) -> Option<Duration> {
        self.seconds.map(Duration::from_secs)
    }
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub seeds: SeedArgs,
    /// Compare only this mode with `kernel` mode (default: user and split).
    #[arg(long, value_enum)]
    pub irqchip: Option<IrqchipMode>,
    /// Operations in each run.
    #[arg(long, value_name = "N", default_value_t = crate::diffguest::DEFAULT_OPS)]
    pub ops: u32,
    /// vCPUs: 1 (CPU 0 alone) or 2 (CPU 0 and CPU 1 operate in turn, IPIs pass between them).
    #[arg(long, value_name = "N", default_value_t = crate::diffguest::DEFAULT_CPUS,
          value_parser = clap::value_parser!(u32).range(1..=2))]
    pub cpus: u32,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The snapshot directory (`memory` and `state.json`).
    #[arg(long, value_name = "DIR", conflicts_with = "incoming")]
    pub snapshot: Option<PathBuf>,
    /// Listen on this Unix socket for one live migration (a source's `vm.send-migration` to
    /// `unix:PATH`), and run the VM it sends.
    #[arg(long, value_name = "PATH")]
    pub incoming: Option<PathBuf>,
    /// Interrupt controller implementation (default: the snapshot's).
    #[arg(long, value_enum)]
    pub irqchip: Option<IrqchipMode>,
    /// Serve the control API on this Unix socket; see docs/operations.md.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Stay paused until `PUT /api/v1/vm.resume`.
    #[arg(long)]
    pub paused: bool,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Run without the seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Not needed: the snapshot carries its CPU model. Accepted if it is the snapshot's
    /// topology, refused otherwise (the guest keeps the CPUs it saw).
    #[arg(long, value_name = "SPEC")]
    pub topology: Option<crate::cpumodel::Topology>,
    /// Not needed: the snapshot carries its CPU model. Items that agree with it are accepted,
    /// one that differs is refused by name.
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    pub cpu_features: Option<crate::cpumodel::FeatureEdits>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The kernel image.
    #[arg(long, value_name = "FILE")]
    pub kernel: PathBuf,
    /// A file passed to the kernel: a multiboot module, or a Linux kernel's initrd.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// The kernel's arguments: after its file name for a multiboot kernel, the whole command line
    /// for Linux.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Number of vCPUs, 1 to KVM_CAP_MAX_VCPUS (1024 here); APIC IDs past 254 need x2APIC.
    /// Default: the --topology's product, else 1.
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// The package hierarchy, QEMU-style: `sockets=S,dies=D,cores=C,threads=T` (missing levels
    /// are 1). APIC IDs get one bit field per level, as wide as its count rounded up to a power
    /// of two (gaps as on real hardware); CPUID leaves 1, 4, 0xB, 0x1F and the MADT agree.
    #[arg(long, value_name = "SPEC")]
    pub topology: Option<crate::cpumodel::Topology>,
    /// CPUID features, QEMU-style `+name,-name` items: x2apic, tsc-deadline,
    /// kvm-msi-ext-dest-id, kvmclock, kvm-pv-eoi; the features hidden for this host's emulator (cx16,
    /// popcnt, rdrand, ...) may only be turned off. What the mode or host cannot honour is
    /// refused (e.g. -x2apic with an APIC ID past 254, +kvm-msi-ext-dest-id in kernel mode).
    #[arg(long, value_name = "LIST", allow_hyphen_values = true)]
    pub cpu_features: Option<crate::cpumodel::FeatureEdits>,
    /// Guest memory: a number of MiB, or with a K/M/G/T suffix.
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_memory)]
    pub memory: u64,
    /// Interrupt controller implementation.
    #[arg(long, value_enum, default_value_t = IrqchipMode::User)]
    pub irqchip: IrqchipMode,
    /// Load the kernel as a raw binary at this guest-physical address (hex with 0x, or decimal)
    /// and enter it there in 32-bit protected mode.
    #[arg(long, value_name = "ADDR", value_parser = parse_address)]
    pub raw_at: Option<u64>,
    /// Stop the VM after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Run without the seccomp filters (for debugging: strace, gdb, a panic backtrace); see
    /// docs/security.md.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket; see docs/operations.md.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Record every interrupt of the run with the flight recorder and write the trace (Chrome
    /// Trace Event JSON: Perfetto, chrome://tracing) to FILE when the VM ends.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Emulate seed 004's protected-state AP boot (user irqchip only; a test of the protocol,
    /// not a protection): no register writes to APs after launch, the first SIPI runs the launch
    /// state (real mode at PAGE << 12, default 0x08), an AP parks with the GHCB MSR's AP Reset
    /// Hold request (WRMSR 0xC0010130 = 0x006) and INIT-SIPI resumes it after that WRMSR with
    /// the answer 0x1007 in the MSR.
    #[arg(
        long,
        value_name = "PAGE",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "0x08",
        value_parser = parse_page
    )]
    pub protected_state_aps: Option<u8>,
    #[command(flatten)]
    pub boundaries: ExactIrqBoundaries,
    /// Diagnostic: `off` does not arm the SYSCALL watch on a kvm_pvm host (the breakpoint on the
    /// guest's page-fault handler that finishes the SYSCALLs this host leaves half done), so that
    /// irqvm takes no part in the guest's page faults. With it off, 64-bit user processes' system
    /// calls do not work on kvm_pvm (nor, on this host, do 32-bit ones: docs/kvm-facts.md). No effect
    /// on other hosts.
    #[arg(long, value_enum, value_name = "on|off", default_value = "on")]
    pub syscall_watch: Switch,
    /// Diagnostic: write KVM's statistics of the VM (KVM_GET_STATS_FD of the VM fd, and of the
    /// vCPU fds summed) to FILE as `name=value` lines, when the VM ends and every
    /// --kvm-stats-every seconds; see docs/operations.md.
    #[arg(long, value_name = "FILE")]
    pub kvm_stats: Option<PathBuf>,
    /// With --kvm-stats: also a reading every SECS seconds (a time series of a long run).
    #[arg(long, value_name = "SECS", requires = "kvm_stats")]
    pub kvm_stats_every: Option<f64>,
}

/// `--exact-irq-boundaries[=on|off]`, shared by `run` and `fuzz-guest`.
#[derive(Debug, clap::Args)]
pub struct ExactIrqBoundaries {
    /// Take every pending interrupt at the instruction boundary where it becomes deliverable
    /// (after `sti; nop`, a CR8 write...), by single-stepping the vCPU while an interrupt waits
    /// (`user` mode; `split`: the PIC's ExtINT; `kernel` ignores it). On by default; `off` takes
    /// it at the next exit or window kick instead (tens of µs to ~1 ms late here), saving the KVM
    /// exit each stepped instruction costs. `--exact-irq-boundaries` alone means `on`.
    #[arg(
        long,
        value_enum,
        value_name = "on|off",
        num_args = 0..=1,
        require_equals = true,
        default_value = "on",
        default_missing_value = "on"
    )]
    pub exact_irq_boundaries: Switch,
}

impl ExactIrqBoundaries {
    /// Whether exact boundaries are on (`VmConfig::exact_irq_boundaries`).
    pub fn on(&self) -> bool {
        self.exact_irq_boundaries.on()
    }
}

/// An on/off option (`--exact-irq-boundaries=on|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn on(self) -> bool {
        self == Switch::On
    }
}

fn parse_memory(text: &str) -> Result<u64, String> {
    memory::parse_size(text)
}

/// A launch page: like a SIPI vector, 0x01-0xFF (page 0 holds the real-mode IVT).
fn parse_page(text: &str) -> Result<u8, String> {
    let page = parse_address(text)?;
    u8::try_from(page)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("'{text}' is not a page number from 0x01 to 0xFF (address >> 12)"))
}

fn parse_address(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not an address"))
}

/// Errors of the command line front end.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--timeout must be a positive number of seconds")]
    BadTimeout,
    #[error("--kvm-stats-every must be a positive number of seconds")]
    BadStatsPeriod,
    #[error(transparent)]
    KvmStats(#[from] crate::kvm_stats::KvmStatsError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("control API: {0}")]
    Api(#[from] crate::api::ServerError),
    #[error(transparent)]
    Trace(#[from] crate::trace::TraceError),
    #[error("cannot draw the timeline: {0}")]
    Svg(String),
    #[error("--from and --to must be numbers of µs with --from < --to")]
    BadWindow,
    #[error("no interrupt of vector {0:#04x} with its injection and EOI in the trace")]
    NoSuchVector(u8),
    #[error("--paused needs --api-sock (nothing else can resume the VM)")]
    PausedWithoutApi,
    #[error("restore needs --snapshot DIR, --incoming PATH, or --api-sock PATH (then vm.restore)")]
    NothingToRestore,
    #[error("live migration: {0}")]
    Migrate(#[from] crate::migrate::MigrateError),
}

/// Exit status when --timeout expires (as timeout(1) uses).
pub const TIMEOUT_STATUS: i32 = 124;

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::ReadFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// The VM configuration for `irqvm run`.
pub fn run_config(args: &RunArgs) -> Result<VmConfig, CliError> {
    let kernel = read_file("kernel", &args.kernel)?;
    let mut cfg = VmConfig::new(kernel, &args.kernel.display().to_string());
    cfg.cmdline = args.cmdline.clone();
    if let Some(path) = &args.initrd {
        cfg.initrd = Some((read_file("initrd", path)?, path.display().to_string()));
    }
    cfg.topology = args.topology;
    cfg.cpus = match (args.cpus, args.topology) {
        (Some(n), _) => n,
        (None, Some(t)) => u32::try_from(t.cpus()).unwrap_or(u32::MAX),
        (None, None) => 1,
    };
    cfg.cpu_features = args.cpu_features.clone().unwrap_or_default();
    cfg.memory = args.memory;
    cfg.irqchip = args.irqchip;
    cfg.raw = args.raw_at.map(|addr| crate::loader::RawImage {
        load_addr: addr,
        entry: addr,
        mode: crate::loader::CpuMode::Protected32,
    });
    cfg.serial = SerialOutput::Stdout;
    cfg.seccomp = !args.no_seccomp;
    cfg.protected_state_aps = args
        .protected_state_aps
        .map(|launch_page| crate::backend::ProtectedStateAps { launch_page });
    cfg.exact_irq_boundaries = args.boundaries.on();
    cfg.syscall_watch = args.syscall_watch.on();
    Ok(cfg)
}

/// The VM configuration of the built-in demo.
pub fn demo_config() -> VmConfig {
    let mut cfg = VmConfig::new(DEMO_GUEST.to_vec(), "demo.elf");
    cfg.cpus = DEMO_CPUS;
    cfg.irqchip = IrqchipMode::User;
    cfg
}

fn parse_timeout(timeout: Option<f64>) -> Result<Option<Duration>, CliError> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t > 0.0 => Ok(Some(Duration::from_secs_f64(t))),
        Some(_) => Err(CliError::BadTimeout),
    }
}

/// The target's answer to a migration source, with the target's report, given once the VM runs.
type Incoming = (crate::migrate::receive::Answer, serde_json::Value);

/// `irqvm restore`: the snapshot read and checked (or the migration received), a VM of its
/// shape built in the chosen mode with its state applied, not started yet.
fn restore_vm(args: &RestoreArgs) -> Result<(VmConfig, Vm, Option<Incoming>), CliError> {
    if args.paused && args.api_sock.is_none() {
        return Err(CliError::PausedWithoutApi);
    }
    let mut cfg = VmConfig::new(Vec::new(), "snapshot");
    cfg.seccomp = !args.no_seccomp;
    if let Some(path) = &args.incoming {
        return receive_vm(path, args.irqchip, cfg);
    }
    let dir = args.snapshot.as_ref().ok_or(CliError::NothingToRestore)?;
    let start = std::time::Instant::now();
    let snapshot = crate::snapshot::load(dir).map_err(VmError::from)?;
    cfg.irqchip = args.irqchip.unwrap_or(snapshot.source_mode);
    cfg.cpus = snapshot.state.header.vcpus;
    cfg.memory = snapshot.state.header.memory_size;
    cfg.topology = args.topology;
    cfg.cpu_features = args.cpu_features.clone().unwrap_or_default();
    let vm = Vm::restore(&snapshot, &cfg)?;
    tracing::info!(elapsed = ?start.elapsed(), mode = ?cfg.irqchip, "snapshot restored");
    Ok((cfg, vm, None))
}

/// `irqvm restore --incoming PATH`: one migration received on `path`, its VM built in `mode`
/// (default: the source's); the source is told if it is refused.
fn receive_vm(
    path: &Path,
    mode: Option<IrqchipMode>,
    mut cfg: VmConfig,
) -> Result<(VmConfig, Vm, Option<Incoming>), CliError> {
    use crate::migrate::receive;
    let listener = receive::listen(path)?;
    let received = receive::receive(&listener);
    let _ = std::fs::remove_file(path);
    let received = received?;
    let start = std::time::Instant::now();
    let source_mode = crate::snapshot::format::mode_from_name(&received.state.header.source_mode);
    cfg.irqchip = mode.or(source_mode).unwrap_or_default();
    match Vm::restore_with_memory(&received.state, received.memory, &cfg) {
        Ok(vm) => {
            let report = serde_json::json!({
                "pages_received": received.pages,
                "receive_ms": received.elapsed.as_secs_f64() * 1000.0,
                "restore_ms": start.elapsed().as_secs_f64() * 1000.0,
                "irqchip": crate::api::control::mode_name(cfg.irqchip),
            });
            tracing::info!(%report, "migration received");
            Ok((cfg, vm, Some((received.answer, report))))
        }
        Err(e) => {
            received.answer.refuse(&e.to_string());
            Err(e.into())
        }
    }
}

/// `irqvm restore --api-sock PATH` alone: serves the API without a VM until `vm.restore`
/// (restored held paused, as Cloud Hypervisor does) or `vm.shutdown`, then runs the VM as
/// `irqvm restore` would, on the same socket.
fn restore_through_api(args: &RestoreArgs) -> Result<i32, CliError> {
    use crate::api::vmm::{Vmm, VmmRequest};
    let timeout = parse_timeout(args.timeout)?;
    let path = args.api_sock.as_ref().ok_or(CliError::NothingToRestore)?;
    let seccomp = !args.no_seccomp;
    // Started before the API thread's filter, for the VM's file work (`api::files`).
    let files = crate::api::files::FileWorker::start().map_err(crate::api::ServerError::Spawn)?;
    // The mode is not known yet: the API thread gets `kernel` mode's filter, whose ioctls
    // include `split`'s (`user`'s are none).
    let filter = seccomp
        .then(|| ThreadFilter::new(Role::Api(IrqchipMode::Kernel)))
        .transpose()
        .map_err(VmError::from)?;
    let (vmm, queue) = Vmm::new();
    let api = crate::api::ApiServer::start_with(path, vmm.clone(), filter)?;
    let mut files = Some(files);
    let (cfg, vm) = loop {
        let Ok(VmmRequest::Restore { request, reply }) = queue.recv() else {
            return Ok(0);
        };
        match restore_request(&request, seccomp).and_then(|(cfg, vm)| {
            let vm = vm
                .start_paused(true)
                .map_err(|e| crate::api::ApiError::Internal(e.to_string()))?;
            Ok((cfg, vm))
        }) {
            Ok((cfg, vm)) => {
                let handle = vm.handle();
                if let Some(worker) = files.take() {
                    let _ = handle.files.set(worker);
                }
                vmm.set_vm(handle);
                let _ = reply.send(Ok(()));
                break (cfg, vm);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    };
    run_to_end(&cfg, vm, Some(api), timeout, None)
}

/// The VM of a `vm.restore` request, not started.
fn restore_request(
    request: &crate::api::model::RestoreRequest,
    seccomp: bool,
) -> Result<(VmConfig, Vm), crate::api::ApiError> {
    use crate::api::ApiError;
    let dir = crate::api::control::file_url_dir("source_url", &request.source_url)?;
    let snapshot = crate::snapshot::load(&dir).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut cfg = VmConfig::new(Vec::new(), "snapshot");
    cfg.seccomp = seccomp;
    cfg.irqchip = match &request.irqchip {
        None => snapshot.source_mode,
        Some(name) => crate::snapshot::format::mode_from_name(name).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "irqchip {name:?} is not one of user, split, kernel"
            ))
        })?,
    };
    let vm = Vm::restore(&snapshot, &cfg).map_err(|e| match e {
        VmError::Snapshot(_) => ApiError::BadRequest(e.to_string()),
        other => ApiError::Internal(other.to_string()),
    })?;
    tracing::info!(dir = %dir.display(), mode = ?cfg.irqchip, "snapshot restored through the API");
    Ok((cfg, vm))
}

/// Runs the command line; returns the process exit status.
pub fn main_with(cli: Cli) -> Result<i32, CliError> {
    let mut incoming = None;
    let mut stats = None;
    let (cfg, timeout, api_sock, vm, paused, trace) = match &cli.command {
        None => {
            let cfg = demo_config();
            let vm = Vm::new(&cfg)?;
            (cfg, None, None, vm, false, None)
        }
        Some(Command::FuzzGuest(args)) => return Ok(fuzz_guest(args)),
        Some(Command::DiffGuest(args)) => return Ok(diff_guest(args)),
        Some(Command::Trace(TraceCommand::Report(args))) => return trace_report(args),
        Some(Command::Run(args)) => {
            let timeout = parse_timeout(args.timeout)?;
            let trace = args.trace.as_deref().map(create_trace_file).transpose()?;
            let cfg = run_config(args)?;
            let vm = Vm::new(&cfg)?;
            stats = start_kvm_stats(args, &vm, cfg.seccomp)?;
            (cfg, timeout, args.api_sock.clone(), vm, false, trace)
        }
        Some(Command::Restore(args)) if args.snapshot.is_none() && args.incoming.is_none() => {
            return restore_through_api(args)
        }
        Some(Command::Restore(args)) => {
            let timeout = parse_timeout(args.timeout)?;
            let (cfg, vm, answer) = restore_vm(args)?;
            incoming = answer;
            (cfg, timeout, args.api_sock.clone(), vm, args.paused, None)
        }
    };
    let tracer = vm.tracer().clone();
    if trace.is_some() {
        tracer.start()?;
    }
    let vm = match vm.start_paused(paused) {
        Ok(vm) => vm,
        Err(e) => {
            if let Some((answer, _)) = incoming.take() {
                answer.refuse(&e.to_string());
            }
            return Err(e.into());
        }
    };
    if let Some((answer, report)) = incoming.take() {
        // The guest runs here now: the source may end.
        if let Err(e) = answer.running(&report) {
            tracing::warn!("the migration source did not hear that the VM runs here: {e}");
        }
    }
    // The API's threads install their own filter (`Role::Api`, with the VM's seccomp setting).
    let api = match api_sock {
        Some(path) => match crate::api::ApiServer::start(&path, vm.handle()) {
            Ok(server) => Some(server),
            Err(e) => {
                vm.stop();
                let _ = vm.wait(None);
                return Err(e.into());
            }
        },
        None => None,
    };
    let status = run_to_end(&cfg, vm, api, timeout, trace.map(|t| (t, tracer)));
    if let Some(stats) = stats {
        stats.finish();
    }
    status
}

/// `--kvm-stats FILE`: the stats fds, taken before the vCPUs run, and the thread that writes them.
fn start_kvm_stats(
    args: &RunArgs,
    vm: &Vm,
    seccomp: bool,
) -> Result<Option<crate::kvm_stats::KvmStatsRecorder>, CliError> {
    let Some(path) = &args.kvm_stats else {
        return Ok(None);
    };
    let every = match args.kvm_stats_every {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 => Some(Duration::from_secs_f64(s)),
        Some(_) => return Err(CliError::BadStatsPeriod),
    };
    let recorder =
        crate::kvm_stats::KvmStatsRecorder::start(vm.kvm_stats()?, path, every, seccomp)?;
    Ok(Some(recorder))
}

/// A started VM's life from here: serial input, the main thread's filter, the wait, the API
/// server's end, the trace file, the exit status.
fn run_to_end(
    cfg: &VmConfig,
    vm: crate::vm::RunningVm,
    api: Option<crate::api::ApiServer>,
    timeout: Option<Duration>,
    trace: Option<(
        (PathBuf, std::fs::File),
        std::sync::Arc<crate::trace::Tracer>,
    )>,
) -> Result<i32, CliError> {
    let filter = cfg
        .seccomp
        .then(|| ThreadFilter::new(Role::Main(cfg.irqchip)))
        .transpose()
        .map_err(VmError::from)?;
    spawn_stdin_reader(vm.devices().clone(), filter.clone());
    // Setup is over: from here the main thread only waits, tears down and reports.
    if let Some(filter) = &filter {
        filter.apply("main").map_err(VmError::from)?;
    }
    let result = vm.wait(timeout);
    drop(api);
    if let Some(((path, file), tracer)) = trace {
        // The file was created before the main thread's filter went on: only writes now.
        let dump = tracer.stop()?;
        crate::trace::chrome::write(&dump, file).map_err(|source| {
            crate::trace::TraceError::Write {
                path: path.display().to_string(),
                source,
            }
        })?;
        eprintln!(
            "irqvm: trace of {} events written to {} ({} dropped)",
            dump.events.len(),
            path.display(),
            dump.dropped_total()
        );
    }
    match result {
        Ok(report) => {
            log_report(&report);
            Ok(report.exit.exit_status())
        }
        Err(VmError::Timeout(t)) => {
            eprintln!("irqvm: the guest did not finish within {t:?}");
            Ok(TIMEOUT_STATUS)
        }
        Err(VmError::Vcpu(failure)) => {
            // The whole report (exit, registers), not just the one-line summary.
            eprintln!("irqvm: {}", failure.report());
            Ok(VMM_ERROR_STATUS)
        }
        Err(e) => Err(e.into()),
    }
}

/// `--trace FILE`: created before the VM starts (and before the seccomp filter, which allows
/// no `open`), written when it ends.
fn create_trace_file(path: &Path) -> Result<(PathBuf, std::fs::File), CliError> {
    let file = std::fs::File::create(path).map_err(|source| crate::trace::TraceError::Write {
        path: path.display().to_string(),
        source,
    })?;
    Ok((path.to_path_buf(), file))
}

/// `irqvm trace report`: the latency table on stdout, and the SVG if asked.
fn trace_report(args: &ReportArgs) -> Result<i32, CliError> {
    use crate::trace::report;
    let trace = report::load(&args.file)?;
    print!("{}", report::text(&trace));
    if let Some(svg) = &args.svg {
        let span = report::span(&trace);
        let ns = |us: f64| (us * 1000.0).round() as u64;
        let mut window = report::Window {
            from: args.from.map_or(span.from, ns),
            to: args.to.map_or(span.to, ns),
        };
        if let Some(vector) = args.focus {
            window =
                report::focus(&trace, vector, window.from).ok_or(CliError::NoSuchVector(vector))?;
        }
        let finite = [args.from, args.to]
            .iter()
            .flatten()
            .all(|v| v.is_finite() && *v >= 0.0);
        if !finite || window.from >= window.to {
            return Err(CliError::BadWindow);
        }
        report::svg(&trace, svg, window).map_err(|e| CliError::Svg(e.to_string()))?;
        println!("\ntimeline written to {}", svg.display());
    }
    Ok(0)
}

/// Exit status when the VMM stops the VM on an error (as for any other VMM error).
pub const VMM_ERROR_STATUS: i32 = 2;

/// `irqvm fuzz-guest`: 0 if every run passed, 1 at the first failure (reported on stderr).
fn fuzz_guest(args: &FuzzArgs) -> i32 {
    use crate::fuzzguest::{run_plan, FuzzPlan};
    let plan = FuzzPlan {
        first_seed: args.seeds.first_seed(),
        duration: args.seeds.duration(),
        modes: match args.irqchip {
            Some(mode) => vec![mode],
            None => vec![IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel],
        },
        cpus: args.cpus.map_or_else(|| vec![1, 2, 4], |n| vec![n]),
        ops: args.ops,
        exact_irq_boundaries: args.boundaries.on(),
    };
    println!("fuzz-guest: first seed {}", plan.first_seed);
    match run_plan(&plan) {
        Ok(runs) => {
            println!("fuzz-guest: {runs} runs, no failure");
            0
        }
        Err((run, failure, output)) => {
            eprintln!(
                "fuzz-guest: FAILED: seed {} {:?} {} vCPU(s): {failure}\n--- guest output ---\n{output}--- replay ---\n{}",
                run.seed,
                run.mode,
                run.cpus,
                run.replay_command()
            );
            1
        }
    }
}

/// `irqvm diff-guest`: 0 if every seed gave the same transcripts, 1 at the first difference or
/// failed run (reported on stderr), 2 when asked to compare `kernel` mode with itself.
fn diff_guest(args: &DiffArgs) -> i32 {
    use crate::diffguest::{run_plan, DiffPlan, REFERENCE};
    let modes = match args.irqchip {
        Some(mode) if mode == REFERENCE => {
            eprintln!("diff-guest: --irqchip kernel is the reference every mode is compared with; give user or split");
            return 2;
        }
        Some(mode) => vec![mode],
        None => vec![IrqchipMode::User, IrqchipMode::Split],
    };
    let plan = DiffPlan {
        first_seed: args.seeds.first_seed(),
        duration: args.seeds.duration(),
        modes,
        ops: args.ops,
        cpus: args.cpus,
    };
    println!("diff-guest: first seed {}", plan.first_seed);
    match run_plan(&plan) {
        Ok(seeds) => {
            println!("diff-guest: {seeds} seed(s), no difference");
            0
        }
        Err(failure) => {
            eprintln!("diff-guest: FAILED: {failure}");
            1
        }
    }
}

fn log_report(report: &RunReport) {
    tracing::info!(exit = ?report.exit, elapsed = ?report.elapsed, "VM finished");
    for (i, s) in report.vcpus.iter().enumerate() {
        tracing::debug!(vcpu = i, ?s, "vCPU statistics");
    }
}

/// Feeds the VMM's stdin to the serial port. The thread ends at EOF; it is never joined (a read
/// of a terminal cannot be interrupted portably), which is harmless as the process exits after
/// the VM.
fn spawn_stdin_reader(
    devices: std::sync::Arc<crate::devices::Devices>,
    filter: Option<ThreadFilter>,
) {
    use std::io::Read;
    let spawned = crate::seccomp::spawn("serial-stdin".into(), filter, move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let taken = devices.serial_input(rest);
                rest = &rest[taken..];
                if taken == 0 {
                    // FIFO full: the guest has not read it yet.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("no serial input: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn no_arguments_means_demo() {
        let cli = Cli::try_parse_from(["irqvm"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(demo_config().cpus, 4);
        assert_eq!(demo_config().irqchip, IrqchipMode::User);
        assert!(!DEMO_GUEST.is_empty());
    }

    #[test]
    fn run_arguments_parse() {
        let cli = Cli::try_parse_from([
            "irqvm",
            "run",
            "--kernel",
            "k.elf",
            "--cpus",
            "2",
            "--memory",
            "1G",
            "--cmdline",
            "a b",
            "--irqchip",
            "kernel",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.cpus, Some(2));
        assert_eq!(args.memory, 1 << 30);
        assert_eq!(args.cmdline, "a b");
        assert_eq!(args.irqchip, IrqchipMode::Kernel);
    }

    /// The SYSCALL watch is on unless `--syscall-watch off`, and the choice reaches the config.
    #[test]
    fn syscall_watch_default_on_and_turn_off() {
        let watch = |extra: &[&str]| {
            let mut argv = vec!["irqvm", "run", "--kernel", "k.elf"];
            argv.extend_from_slice(extra);
            let cli = Cli::try_parse_from(argv).unwrap();
            let Some(Command::Run(args)) = cli.command else {
                panic!("not run");
            };
            args.syscall_watch.on()
        };
        assert!(watch(&[]));
        assert!(watch(&["--syscall-watch", "on"]));
        assert!(!watch(&["--syscall-watch", "off"]));
        assert!(
            Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--syscall-watch", "x"]).is_err()
        );
    }

    /// Exact boundaries are on unless `--exact-irq-boundaries=off`; the bare flag means on.
    #[test]
    fn exact_irq_boundaries_default_on_and_turn_off() {
        let exact = |extra: &[&str]| {
            let mut argv = vec!["irqvm", "run", "--kernel", "k.elf"];
            argv.extend_from_slice(extra);
            let cli = Cli::try_parse_from(argv).unwrap();
            let Some(Command::Run(args)) = cli.command else {
                panic!("not run");
            };
            args.boundaries.on()
        };
        assert!(exact(&[]));
        assert!(exact(&["--exact-irq-boundaries"]));
        assert!(exact(&["--exact-irq-boundaries=on"]));
        assert!(!exact(&["--exact-irq-boundaries=off"]));
        assert!(
            Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--exact-irq-boundaries=x"])
                .is_err()
        );
        let fuzz =
            Cli::try_parse_from(["irqvm", "fuzz-guest", "--exact-irq-boundaries=off"]).unwrap();
        let Some(Command::FuzzGuest(args)) = fuzz.command else {
            panic!("not fuzz-guest");
        };
        assert!(!args.boundaries.on());
    }

    #[test]
    fn topology_and_cpu_features_parse_and_set_the_count() {
        let cli = Cli::try_parse_from([
            "irqvm",
            "run",
            "--kernel",
            "k.elf",
            "--topology",
            "sockets=2,cores=3,threads=2",
            "--cpu-features",
            "-x2apic,+tsc-deadline",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("not run");
        };
        let topology = args.topology.unwrap();
        assert_eq!(topology.cpus(), 12);
        let edits = args.cpu_features.clone().unwrap();
        assert_eq!(edits.get(crate::cpumodel::Feature::X2apic), Some(false));
        assert!(
            Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--topology", "cores=0"])
                .is_err()
        );
        assert!(
            Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--cpu-features", "+nope"])
                .is_err()
        );
    }

    #[test]
    fn run_defaults_to_the_user_irqchip() {
        let cli = Cli::try_parse_from(["irqvm", "run", "--kernel", "k.elf"]).unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.irqchip, IrqchipMode::User);
    }

    #[test]
    fn the_three_irqchip_modes_are_offered_and_nothing_else() {
        for mode in ["user", "split", "kernel"] {
            let r = Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--irqchip", mode]);
            assert!(r.is_ok(), "{mode} refused");
        }
        for mode in ["bogus", "none", ""] {
            let r = Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--irqchip", mode]);
            assert!(r.is_err(), "{mode} accepted");
        }
    }

    #[test]
    fn bad_memory_size_is_rejected() {
        let r = Cli::try_parse_from(["irqvm", "run", "--kernel", "k", "--memory", "12Q"]);
        assert!(r.is_err());
    }

    #[test]
    fn missing_kernel_file_is_named() {
        let cli = Cli::try_parse_from(["irqvm", "run", "--kernel", "/nonexistent/k.elf"]).unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("not run");
        };
        let err = run_config(&args).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/k.elf"), "{err}");
    }

    #[test]
    fn protected_state_aps_takes_an_optional_launch_page() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["irqvm", "run", "--kernel", "k"];
            argv.extend_from_slice(extra);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Some(Command::Run(args))) => Ok(args.protected_state_aps),
                Ok(_) => panic!("not run"),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["--protected-state-aps"]), Ok(Some(0x08)));
        assert_eq!(parse(&["--protected-state-aps=0x9a"]), Ok(Some(0x9A)));
        assert!(parse(&["--protected-state-aps=0"]).is_err());
        assert!(parse(&["--protected-state-aps=0x100"]).is_err());
    }

    #[test]
    fn restore_arguments_parse_and_paused_needs_the_api() {
        let cli = Cli::try_parse_from([
            "irqvm",
            "restore",
            "--snapshot",
            "/nonexistent/snap",
            "--irqchip",
            "split",
            "--paused",
        ])
        .unwrap();
        let Some(Command::Restore(args)) = cli.command else {
            panic!("not restore");
        };
        assert_eq!(args.irqchip, Some(IrqchipMode::Split));
        assert!(matches!(restore_vm(&args), Err(CliError::PausedWithoutApi)));
        assert!(
            Cli::try_parse_from(["irqvm", "restore", "--snapshot", "a", "--incoming", "b"])
                .is_err()
        );
        let cli = Cli::try_parse_from(["irqvm", "restore", "--snapshot", "/nonexistent/snap"]);
        let Ok(Cli {
            command: Some(Command::Restore(args)),
        }) = cli
        else {
            panic!("not restore");
        };
        assert_eq!(args.irqchip, None, "the snapshot's mode by default");
        let nothing = Cli::try_parse_from(["irqvm", "restore"]).unwrap();
        let Some(Command::Restore(nothing)) = nothing.command else {
            panic!("not restore");
        };
        assert!(matches!(
            restore_through_api(&nothing),
            Err(CliError::NothingToRestore)
        ));
        let err = restore_vm(&args)
            .err()
            .expect("no such snapshot")
            .to_string();
        assert!(err.contains("/nonexistent/snap"), "{err}");
    }

    #[test]
    fn raw_address_parses_hex_and_decimal() {
        assert_eq!(parse_address("0x100000").unwrap(), 0x100000);
        assert_eq!(parse_address("4096").unwrap(), 4096);
        assert!(parse_address("zz").is_err());
    }
}
