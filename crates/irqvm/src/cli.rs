//! Command line: `irqvm run --kernel FILE ...`, and `irqvm` alone for the built-in demo.

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
    /// Run the hostile-guest fuzzer (guests/fuzz.c) seed after seed in every irqchip mode and on
    /// 1, 2 and 4 vCPUs (or those given), each run under a watchdog; stops at the first failing
    /// seed and prints the command that replays it.
    FuzzGuest(FuzzArgs),
}

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Keep running seeds for this many seconds (without it: one round with one seed).
    #[arg(long, value_name = "N")]
    pub seconds: Option<u64>,
    /// The first seed (default: from the clock); later rounds count up from it.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// Only this irqchip mode (default: user, split and kernel).
    #[arg(long, value_enum)]
    pub irqchip: Option<IrqchipMode>,
    /// Only this vCPU count (default: 1, 2 and 4).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Operations per vCPU in each run.
    #[arg(long, value_name = "N", default_value_t = crate::fuzzguest::DEFAULT_OPS)]
    pub ops: u32,
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
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,
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
    /// Take every pending interrupt at the instruction boundary where it becomes deliverable
    /// (after `sti; nop`, a CR8 write...), by single-stepping the vCPU while an interrupt waits
    /// (`user` mode; `split`: the PIC's ExtINT). Costs a KVM exit per stepped instruction.
    #[arg(long)]
    pub exact_irq_boundaries: bool,
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
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("control API: {0}")]
    Api(#[from] crate::api::ServerError),
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
    cfg.cpus = args.cpus;
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
    cfg.exact_irq_boundaries = args.exact_irq_boundaries;
    Ok(cfg)
}

/// The VM configuration of the built-in demo.
pub fn demo_config() -> VmConfig {
    let mut cfg = VmConfig::new(DEMO_GUEST.to_vec(), "demo.elf");
    cfg.cpus = DEMO_CPUS;
    cfg.irqchip = IrqchipMode::User;
    cfg
}

/// Runs the command line; returns the process exit status.
pub fn main_with(cli: Cli) -> Result<i32, CliError> {
    let (cfg, timeout, api_sock) = match &cli.command {
        None => (demo_config(), None, None),
        Some(Command::FuzzGuest(args)) => return Ok(fuzz_guest(args)),
        Some(Command::Run(args)) => {
            let timeout = match args.timeout {
                None => None,
                Some(t) if t.is_finite() && t > 0.0 => Some(Duration::from_secs_f64(t)),
                Some(_) => return Err(CliError::BadTimeout),
            };
            (run_config(args)?, timeout, args.api_sock.clone())
        }
    };
    let vm = Vm::new(&cfg)?.start()?;
    let filter = cfg
        .seccomp
        .then(|| ThreadFilter::new(Role::Main(cfg.irqchip)))
        .transpose()
        .map_err(VmError::from)?;
    spawn_stdin_reader(vm.devices().clone(), filter.clone());
    // The API server's threads are created before the main thread's filter goes on, so they are
    // not filtered (docs/security.md, "Not covered yet").
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
    // Setup is over: from here the main thread only waits, tears down and reports.
    if let Some(filter) = &filter {
        filter.apply("main").map_err(VmError::from)?;
    }
    let result = vm.wait(timeout);
    drop(api);
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

/// Exit status when the VMM stops the VM on an error (as for any other VMM error).
pub const VMM_ERROR_STATUS: i32 = 2;

/// `irqvm fuzz-guest`: 0 if every run passed, 1 at the first failure (reported on stderr).
fn fuzz_guest(args: &FuzzArgs) -> i32 {
    use crate::fuzzguest::{clock_seed, run_plan, FuzzPlan};
    let plan = FuzzPlan {
        first_seed: args.seed.unwrap_or_else(clock_seed),
        duration: args.seconds.map(Duration::from_secs),
        modes: match args.irqchip {
            Some(mode) => vec![mode],
            None => vec![IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel],
        },
        cpus: args.cpus.map_or_else(|| vec![1, 2, 4], |n| vec![n]),
        ops: args.ops,
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
        assert_eq!(args.cpus, 2);
        assert_eq!(args.memory, 1 << 30);
        assert_eq!(args.cmdline, "a b");
        assert_eq!(args.irqchip, IrqchipMode::Kernel);
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
    fn raw_address_parses_hex_and_decimal() {
        assert_eq!(parse_address("0x100000").unwrap(), 0x100000);
        assert_eq!(parse_address("4096").unwrap(), 4096);
        assert!(parse_address("zz").is_err());
    }
}
