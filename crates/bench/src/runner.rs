//! Running one benchmark VM as a child process: irqvm (this binary again, `irqvm-bench
//! --vm-child ...`) or QEMU, measured the same way. The parent reads the child's serial output as it comes; at every
//! `MARK:` line it sums the on-CPU time of the child's threads (`/proc/PID/task/*/schedstat`, ns),
//! and at the end `wait4` gives the child's CPU time and peak resident memory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use irqvm::IrqchipMode;

use crate::parse;
use crate::perfstat::{PerfStat, PerfTrace};

/// A VMM the suite compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Irqvm(IrqchipMode),
    /// QEMU with KVM and its in-kernel irqchip (the default `kernel-irqchip=on`).
    QemuKvm,
    /// QEMU with TCG: its own userspace APIC, IOAPIC and PIC.
    QemuTcg,
}

impl Peer {
    pub fn name(&self) -> String {
        match self {
            Self::Irqvm(mode) => {
                use clap::ValueEnum;
                let mode = mode
                    .to_possible_value()
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_else(|| format!("{mode:?}").to_lowercase());
                format!("irqvm-{mode}")
            }
            Self::QemuKvm => "qemu-kvm".into(),
            Self::QemuTcg => "qemu-tcg".into(),
        }
    }

    /// Table order: irqvm's modes in `IrqchipMode` order, then QEMU/KVM, QEMU/TCG.
    fn rank(&self) -> usize {
        use clap::ValueEnum;
        let modes = IrqchipMode::value_variants();
        match self {
            Self::Irqvm(m) => modes.iter().position(|x| x == m).unwrap_or(0),
            Self::QemuKvm => modes.len(),
            Self::QemuTcg => modes.len() + 1,
        }
    }

    pub fn is_irqvm(&self) -> bool {
        matches!(self, Self::Irqvm(_))
    }

    /// The most vCPUs this peer is run with: irqvm up to KVM's limit; QEMU 7.2 (Debian 12)
    /// refuses more than 288 (its q35 machine's limit, "Invalid SMP CPUs 1024. The max CPUs
    /// supported by machine 'pc-q35-7.2' is 288"); QEMU/TCG to 255, the `pc` machine's limit (its
    /// APIC model in 7.2 has no x2APIC mode, so IDs past 254 are out of its reach anyway).
    pub fn max_cpus(&self) -> u32 {
        match self {
            Self::Irqvm(_) => u32::MAX,
            Self::QemuKvm => QEMU_MAX_CPUS,
            Self::QemuTcg => 255,
        }
    }
}

/// The largest `-smp` QEMU accepts here (q35; the `pc` machine stops at 255).
pub const QEMU_MAX_CPUS: u32 = 288;

/// QEMU's machine for `cpus` vCPUs: `pc` as far as it goes (255: APIC IDs up to 254, xAPIC can
/// address them all); past that q35 with the split irqchip, the configuration in which QEMU
/// with KVM accepts APIC IDs above 254 without an IOMMU (KVM_CAP_X2APIC_API and the extended
/// destination ID for its IOAPIC).
fn qemu_machine(cpus: u32) -> &'static str {
    if cpus <= 255 {
        "pc"
    } else {
        "q35,kernel-irqchip=split"
    }
}

impl PartialOrd for Peer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Peer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// The QEMU binary, if installed.
pub fn find_qemu() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// One VM to run.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub peer: Peer,
    pub kernel: PathBuf,
    pub cpus: u32,
    pub cmdline: String,
    /// irqvm only: a host thread drives device lines (`child.rs`).
    pub host_driver: bool,
    /// Host-driven pulses per step and the open-loop rates (with `host_driver`).
    pub host_pulses: u32,
    pub host_rates: Vec<u64>,
    pub timeout: Duration,
    /// Count syscalls and KVM events per workload with `perf stat` (`perfstat.rs`).
    pub perf: bool,
}

/// What one child run produced.
#[derive(Clone, Debug, Default)]
pub struct RunResult {
    pub output: parse::RunOutput,
    /// `(begin|end, workload)` → on-CPU ns of the child's threads at that mark.
    pub cpu_marks: std::collections::BTreeMap<(String, String), u64>,
    /// `(begin|end, workload)` → when the parent read that mark.
    pub mark_times: std::collections::BTreeMap<(String, String), Instant>,
    /// Per-interval syscall and KVM event counts (`perfstat.rs`), if perf ran.
    pub perf: Option<PerfTrace>,
    pub cpu_total_ns: u64,
    pub max_rss_kib: u64,
    pub wall: Duration,
    pub exit_status: Option<i32>,
    pub timed_out: bool,
    pub text: String,
}

impl RunResult {
    /// Host CPU ns between the `begin` and `end` marks of `name`.
    pub fn phase_cpu_ns(&self, name: &str) -> Option<u64> {
        let get = |edge: &str| {
            self.cpu_marks
                .get(&(edge.to_string(), name.to_string()))
                .copied()
        };
        Some(get("end")?.saturating_sub(get("begin")?))
    }

    /// perf's counts per event between the `begin` and `end` marks of `name`.
    pub fn phase_perf(&self, name: &str) -> Option<std::collections::BTreeMap<String, u64>> {
        let get = |edge: &str| {
            self.mark_times
                .get(&(edge.to_string(), name.to_string()))
                .copied()
        };
        self.perf.as_ref()?.phase(get("begin")?, get("end")?)
    }
}

fn command(spec: &RunSpec, qemu: Option<&Path>) -> std::io::Result<Command> {
    let mut cmd = match spec.peer {
        Peer::Irqvm(mode) => {
            use clap::ValueEnum;
            let mut c = Command::new(std::env::current_exe()?);
            let mode = mode
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            c.arg("--vm-child")
                .arg(&spec.kernel)
                .args(["--child-cpus", &spec.cpus.to_string()])
                .args(["--child-timeout", &spec.timeout.as_secs().to_string()])
                .args(["--child-irqchip", &mode])
                .args(["--child-cmdline", &spec.cmdline]);
            if spec.host_driver {
                let rates: Vec<String> = spec.host_rates.iter().map(u64::to_string).collect();
                c.arg("--child-host-driver")
                    .args(["--child-pulses", &spec.host_pulses.to_string()])
                    .args(["--child-rates", &rates.join(",")]);
            }
            c
        }
        Peer::QemuKvm | Peer::QemuTcg => {
            let qemu = qemu.ok_or_else(|| std::io::Error::other("QEMU is not installed"))?;
            let mut c = Command::new(qemu);
            // kvm_pvm rejects the IA32_ARCH_CAPABILITIES value QEMU sets for -cpu max (run-qemu.sh).
            let (accel, cpu) = if spec.peer == Peer::QemuKvm {
                ("kvm", "max,-arch-capabilities")
            } else {
                ("tcg", "max")
            };
            c.args([
                "-machine",
                qemu_machine(spec.cpus),
                "-accel",
                accel,
                "-cpu",
                cpu,
            ])
            .args(["-smp", &spec.cpus.to_string(), "-m", "128"])
            .arg("-kernel")
            .arg(&spec.kernel)
            .args(["-append", &spec.cmdline])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .args(["-nic", "none", "-no-reboot"])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .args(["-device", "pc-testdev"]);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    Ok(cmd)
}

/// Sum of the on-CPU ns of every thread of `pid` (threads that already ended are not counted:
/// the VMs measured keep their threads for the whole run).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Runs `spec` to completion (or its timeout, then the child is killed).
pub fn run(spec: &RunSpec, qemu: Option<&Path>) -> std::io::Result<RunResult> {
    let started = Instant::now();
    let mut child = command(spec, qemu)?.spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout is piped");
    // The watchdog kills the child at the timeout unless the parent has reaped it (under the
    // lock, so a reused pid is never signalled).
    let reaped = Arc::new(Mutex::new(false));
    let timed_out = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (reaped, timed_out, deadline) =
            (reaped.clone(), timed_out.clone(), started + spec.timeout);
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(50));
            let done = reaped.lock().unwrap_or_else(|p| p.into_inner());
            if *done {
                return;
            }
            if Instant::now() >= deadline {
                timed_out.store(true, std::sync::atomic::Ordering::SeqCst);
                // SAFETY: plain syscall on our own unreaped child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return;
            }
        })
    };
    let mut result = RunResult::default();
    let mut perf = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        // The first line: the VM's threads exist (`perfstat.rs`).
        if perf.is_none() && spec.perf {
            perf = Some(PerfStat::attach(pid));
        }
        if let Some((edge, name)) = parse::mark(&line) {
            let key = (edge.to_string(), name.to_string());
            result.mark_times.insert(key.clone(), Instant::now());
            result.cpu_marks.insert(key, process_cpu_ns(pid));
        }
        result.text.push_str(&line);
        result.text.push('\n');
    }
    let (status, usage) = reap(pid, &reaped);
    result.perf = perf.flatten().map(PerfStat::finish);
    let _ = watchdog.join();
    drop(child); // already reaped: dropping a std Child does not wait
    result.output = parse::RunOutput::parse(&result.text);
    result.wall = started.elapsed();
    result.timed_out = timed_out.load(std::sync::atomic::Ordering::SeqCst);
    result.exit_status = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    let tv_ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    result.cpu_total_ns = tv_ns(usage.ru_utime) + tv_ns(usage.ru_stime);
    result.max_rss_kib = usage.ru_maxrss as u64;
    Ok(result)
}

/// Waits for `pid` with `wait4`, polling so that the watchdog can take the lock in between.
fn reap(pid: u32, reaped: &Mutex<bool>) -> (libc::c_int, libc::rusage) {
    loop {
        let mut done = reaped.lock().unwrap_or_else(|p| p.into_inner());
        let mut status = 0;
        // SAFETY: rusage is plain data, fully written by wait4 on success.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child with valid out-pointers.
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid as libc::pid_t || r < 0 {
            *done = true;
            return (status, usage);
        }
        drop(done);
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The parent starts an irqvm child as this binary with `--vm-child`: the words it passes
    /// must be ones `Args` accepts, and carry the spec through unchanged.
    #[test]
    fn an_irqvm_child_command_is_one_this_binary_parses() {
        let spec = RunSpec {
            peer: Peer::Irqvm(IrqchipMode::User),
            kernel: PathBuf::from("k.elf"),
            cpus: 2,
            cmdline: "n=20".into(),
            host_driver: true,
            host_pulses: 40,
            host_rates: vec![1000, 4000],
            timeout: Duration::from_secs(1),
            perf: false,
        };
        let cmd = command(&spec, None).unwrap();
        assert_eq!(cmd.get_program(), std::env::current_exe().unwrap());
        let words = std::iter::once(std::ffi::OsStr::new("irqvm-bench")).chain(cmd.get_args());
        let args = crate::cli::Args::try_parse_from(words).unwrap();
        assert_eq!(args.vm_child.as_deref(), Some(Path::new("k.elf")));
        assert_eq!(args.child_cpus, 2);
        assert_eq!(args.child_timeout, 1);
        assert_eq!(args.child_irqchip, IrqchipMode::User);
        assert_eq!(args.child_cmdline, "n=20");
        assert!(args.child_host_driver);
        assert_eq!(args.child_pulses, 40);
        assert_eq!(args.child_rates, vec![1000, 4000]);
    }

    #[test]
    fn a_qemu_peer_needs_qemu() {
        let spec = RunSpec {
            peer: Peer::QemuKvm,
            kernel: PathBuf::from("k.elf"),
            cpus: 1,
            cmdline: String::new(),
            host_driver: false,
            host_pulses: 0,
            host_rates: Vec::new(),
            timeout: Duration::from_secs(1),
            perf: false,
        };
        assert!(command(&spec, None).is_err());
    }
}
