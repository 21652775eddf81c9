//! `irqvm fuzz-guest`: the hostile-guest fuzzer (guests/fuzz.c) run seed after seed, in each
//! irqchip mode and vCPU count asked for, under a watchdog.
//!
//! A run passes when the guest ends the VM itself (isa-debug-exit) with every check passed: its
//! heartbeat CPU got through all its operations. A VMM error, a triple fault, a VM that outlives
//! its time bound, or a VMM that cannot even be stopped fails it; the failing seed, mode and vCPU
//! count are printed with the command that replays exactly that run (the guest's operations depend
//! only on the seed and the vCPU count).

use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::devices::{SerialCapture, SerialOutput};
use crate::vcpu::GuestExit;
use crate::vm::{RunReport, Vm, VmConfig, VmError};
use crate::IrqchipMode;

/// The fuzzer guest.
pub static FUZZ_GUEST: &[u8] = include_bytes!(concat!(env!("IRQVM_GUESTS_DIR"), "/fuzz.elf"));

/// Operations per vCPU in one run (the guest's `ops=`).
pub const DEFAULT_OPS: u32 = 1500;
/// How long one run may take before the VM is stopped (the guest is then hung or too slow).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// The watchdog's own bound: a VM that cannot be stopped within this is a hung VMM.
pub const STOP_GRACE: Duration = Duration::from_secs(15);

/// One fuzzer run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FuzzRun {
    pub seed: u64,
    pub mode: IrqchipMode,
    pub cpus: u32,
    pub ops: u32,
    /// `VmConfig::exact_irq_boundaries` (single-stepping to exact interrupt boundaries).
    pub exact_irq_boundaries: bool,
}

impl FuzzRun {
    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mode = format!("{:?}", self.mode).to_lowercase();
        let exact = if self.exact_irq_boundaries {
            "on"
        } else {
            "off"
        };
        format!(
            "cargo run --release -p irqvm -- fuzz-guest --seed {} --irqchip {mode} --cpus {} --ops {} --exact-irq-boundaries={exact}",
            self.seed, self.cpus, self.ops
        )
    }

    fn config(&self, capture: SerialCapture) -> VmConfig {
        let mut cfg = VmConfig::new(FUZZ_GUEST.to_vec(), "fuzz.elf");
        cfg.cmdline = format!("seed={} ops={}", self.seed, self.ops);
        cfg.cpus = self.cpus;
        cfg.irqchip = self.mode;
        cfg.exact_irq_boundaries = self.exact_irq_boundaries;
        cfg.serial = SerialOutput::Capture(capture);
        cfg
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum FuzzFailure {
    #[error("the VMM failed: {0}")]
    Vmm(String),
    #[error("the guest did not end the VM within {0:?} (hang or livelock)")]
    Timeout(Duration),
    #[error("the VMM could not stop the VM within {0:?} after its time bound (VMM hang)")]
    Hung(Duration),
    #[error("the VM ended without the guest's own exit: {0:?}")]
    NotGuestExit(GuestExit),
    #[error("the guest reported failures or no result (exit status {0})")]
    GuestChecks(i32),
}

/// Runs `run` under the watchdog; `Ok` with the guest's output, or the failure and the output.
pub fn run_once(run: &FuzzRun, timeout: Duration) -> Result<String, (FuzzFailure, String)> {
    let capture = SerialCapture::new();
    let cfg = run.config(capture.clone());
    run_watched(cfg, &capture, timeout)
}

/// Runs the VM `cfg` describes, whose serial output goes to `capture`, under the watchdog: it
/// passes when the guest ends it itself with every check passed. `Ok` with the guest's output,
/// or the failure and the output.
pub fn run_watched(
    cfg: VmConfig,
    capture: &SerialCapture,
    timeout: Duration,
) -> Result<String, (FuzzFailure, String)> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("fuzz-vm".into())
        .spawn(move || {
            let result = Vm::new(&cfg).and_then(|vm| vm.run(Some(timeout)));
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        return Err((FuzzFailure::Vmm(e.to_string()), String::new()));
    }
    // A hung VMM thread is left behind: the process reports and ends.
    let result = rx.recv_timeout(timeout + STOP_GRACE);
    let output = capture.text();
    match judge(result, timeout) {
        Ok(()) => Ok(output),
        Err(f) => Err((f, output)),
    }
}

fn judge(
    result: Result<Result<RunReport, VmError>, mpsc::RecvTimeoutError>,
    timeout: Duration,
) -> Result<(), FuzzFailure> {
    let report = match result {
        Err(_) => return Err(FuzzFailure::Hung(STOP_GRACE)),
        Ok(Err(VmError::Timeout(_))) => return Err(FuzzFailure::Timeout(timeout)),
        Ok(Err(VmError::Vcpu(failure))) => return Err(FuzzFailure::Vmm(failure.report())),
        Ok(Err(e)) => return Err(FuzzFailure::Vmm(e.to_string())),
        Ok(Ok(report)) => report,
    };
    match report.exit {
        // debug-exit 0 (every check passed) gives status 1.
        GuestExit::DebugExit { status: 1 } => Ok(()),
        GuestExit::DebugExit { status } => Err(FuzzFailure::GuestChecks(status)),
        other => Err(FuzzFailure::NotGuestExit(other)),
    }
}

/// What `irqvm fuzz-guest` does.
#[derive(Clone, Debug)]
pub struct FuzzPlan {
    /// The first seed (later ones count up from it).
    pub first_seed: u64,
    /// Keep going until this much time has passed; `None`: one round (each mode and count once).
    pub duration: Option<Duration>,
    pub modes: Vec<IrqchipMode>,
    pub cpus: Vec<u32>,
    pub ops: u32,
    pub exact_irq_boundaries: bool,
}

/// A seed from the clock, for runs without `--seed`.
pub fn clock_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) % 1_000_000_007
}

/// Runs the plan, printing one line per run to stdout; returns the first failing run.
pub fn run_plan(plan: &FuzzPlan) -> Result<u32, (FuzzRun, FuzzFailure, String)> {
    let start = Instant::now();
    let mut runs = 0;
    let mut seed = plan.first_seed;
    loop {
        for &mode in &plan.modes {
            for &cpus in &plan.cpus {
                let run = FuzzRun {
                    seed,
                    mode,
                    cpus,
                    ops: plan.ops,
                    exact_irq_boundaries: plan.exact_irq_boundaries,
                };
                let t = Instant::now();
                match run_once(&run, RUN_TIMEOUT) {
                    Ok(_) => println!(
                        "fuzz-guest: seed {seed} {mode:?} {cpus} vCPU(s): ok ({:.1} s)",
                        t.elapsed().as_secs_f64()
                    ),
                    Err((failure, output)) => return Err((run, failure, output)),
                }
                runs += 1;
            }
        }
        seed += 1;
        match plan.duration {
            Some(d) if start.elapsed() < d => {}
            _ => return Ok(runs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replay_command_names_everything_that_defines_the_run() {
        let run = FuzzRun {
            seed: 42,
            mode: IrqchipMode::Split,
            cpus: 4,
            ops: 100,
            exact_irq_boundaries: false,
        };
        let cmd = run.replay_command();
        for part in [
            "--seed 42",
            "--irqchip split",
            "--cpus 4",
            "--ops 100",
            "--exact-irq-boundaries=off",
        ] {
            assert!(cmd.contains(part), "{cmd}");
        }
        assert_eq!(run.config(SerialCapture::new()).cmdline, "seed=42 ops=100");
    }

    #[test]
    fn only_the_guests_own_clean_exit_passes() {
        let t = Duration::from_secs(1);
        let report = |exit| {
            Ok(Ok(RunReport {
                exit,
                elapsed: t,
                vcpus: vec![],
                mp_states: vec![],
            }))
        };
        assert!(judge(report(GuestExit::DebugExit { status: 1 }), t).is_ok());
        assert!(matches!(
            judge(report(GuestExit::DebugExit { status: 3 }), t),
            Err(FuzzFailure::GuestChecks(3))
        ));
        assert!(matches!(
            judge(report(GuestExit::Shutdown), t),
            Err(FuzzFailure::NotGuestExit(_))
        ));
        assert!(matches!(
            judge(Ok(Err(VmError::Timeout(t))), t),
            Err(FuzzFailure::Timeout(_))
        ));
        assert!(matches!(
            judge(Err(mpsc::RecvTimeoutError::Timeout), t),
            Err(FuzzFailure::Hung(_))
        ));
    }
}
