//! `irqvm diff-guest`: the differential guest (guests/regdiff.c) run seed after seed in `kernel`
//! mode, the reference (KVM's LAPIC, IOAPIC and PIC), and in each mode compared with it. Every
//! transcript must equal the reference's line for line: one line per operation, with what the
//! operation read and a hash of every register the guest can read afterwards. At the first
//! difference both runs are repeated with `dump=1` (each line lists the values instead of their
//! hash) up to that operation, and the registers that differ there are named.
//!
//! What differs between the modes by design (docs/irqchip-modes.md) the guest never does or
//! leaves out of its state; its header lists each case.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::devices::{SerialCapture, SerialOutput};
use crate::fuzzguest::{run_watched, FuzzFailure};
use crate::vm::VmConfig;
use crate::IrqchipMode;

/// The differential guest.
pub static DIFF_GUEST: &[u8] = include_bytes!(concat!(env!("IRQVM_GUESTS_DIR"), "/regdiff.elf"));

/// Operations in one run (the guest's `ops=`).
pub const DEFAULT_OPS: u32 = 800;
/// How long one run may take (a `dump=1` run of 800 operations takes about a minute here).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(240);
/// The mode every other mode is compared with.
pub const REFERENCE: IrqchipMode = IrqchipMode::Kernel;

/// The vCPUs a run has by default: CPU 0 and CPU 1 both operate, and IPIs pass between them.
pub const DEFAULT_CPUS: u32 = 2;

/// What every mode runs the same: the guest's seed, its operations, and the vCPUs (1: CPU 0
/// alone; 2: CPU 0 and CPU 1 in lock step; more: the others parked with interrupts off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffCase {
    pub seed: u64,
    pub ops: u32,
    pub cpus: u32,
}

/// One run of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffRun {
    pub case: DiffCase,
    pub mode: IrqchipMode,
    /// `dump=1`: every value listed instead of the hash.
    pub dump: bool,
}

impl DiffRun {
    fn cmdline(&self) -> String {
        format!(
            "seed={} ops={} dump={}",
            self.case.seed,
            self.case.ops,
            u8::from(self.dump)
        )
    }

    fn config(&self, capture: SerialCapture) -> VmConfig {
        let mut cfg = VmConfig::new(DIFF_GUEST.to_vec(), "regdiff.elf");
        cfg.cmdline = self.cmdline();
        cfg.cpus = self.case.cpus;
        cfg.irqchip = self.mode;
        cfg.serial = SerialOutput::Capture(capture);
        cfg
    }

    /// The guest's transcript (its whole serial output), or why the run failed.
    pub fn transcript(&self, timeout: Duration) -> Result<String, (FuzzFailure, String)> {
        let capture = SerialCapture::new();
        run_watched(self.config(capture.clone()), &capture, timeout)
    }

    /// The command that shows this run's transcript.
    pub fn show_command(&self) -> String {
        format!(
            "irqvm run --kernel {}/regdiff.elf --cpus {} --irqchip {} --cmdline '{}'",
            env!("IRQVM_GUESTS_DIR"),
            self.case.cpus,
            mode_name(self.mode),
            self.cmdline()
        )
    }
}

fn mode_name(mode: IrqchipMode) -> String {
    format!("{mode:?}").to_lowercase()
}

/// The first line (counted from 1) at which two transcripts differ, with both lines (empty past
/// the end of one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Divergence {
    pub line: usize,
    pub reference: String,
    pub other: String,
}

/// Where `other` first differs from `reference`, if it does.
pub fn first_divergence(reference: &str, other: &str) -> Option<Divergence> {
    let (mut a, mut b) = (reference.lines(), other.lines());
    let mut line = 0;
    loop {
        line += 1;
        match (a.next(), b.next()) {
            (None, None) => return None,
            (x, y) if x == y => {}
            (x, y) => {
                return Some(Divergence {
                    line,
                    reference: x.unwrap_or_default().to_string(),
                    other: y.unwrap_or_default().to_string(),
                })
            }
        }
    }
}

/// The operation number a transcript line starts with (`0042 mmio 350 <- ... s=...`; at least
/// four digits, more past operation 9999).
fn operation_of(line: &str) -> Option<u32> {
    let number = line.split_whitespace().next()?;
    let digits = number.len() >= 4 && number.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| number.parse().ok())?
}

/// One value that differs between two `dump=1` lines: what it is, the reference's and the other's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueDifference {
    pub what: String,
    pub reference: String,
    pub other: String,
}

/// The values that differ between two `dump=1` lines of the same operation
/// (`NNNN what -> result | key=value ...`): the operation's result, then each key by name.
pub fn differing_values(reference: &str, other: &str) -> Vec<ValueDifference> {
    let (ref_head, ref_values) = split_dump_line(reference);
    let (other_head, other_values) = split_dump_line(other);
    let mut out = Vec::new();
    if ref_head != other_head {
        out.push(ValueDifference {
            what: "the operation's result".into(),
            reference: ref_head.to_string(),
            other: other_head.to_string(),
        });
    }
    let keys: std::collections::BTreeSet<&str> = ref_values
        .keys()
        .chain(other_values.keys())
        .copied()
        .collect();
    for key in keys {
        let (a, b) = (ref_values.get(key), other_values.get(key));
        if a != b {
            out.push(ValueDifference {
                what: key_name(key),
                reference: a.map_or("(not read)", |v| v).to_string(),
                other: b.map_or("(not read)", |v| v).to_string(),
            });
        }
    }
    out
}

fn split_dump_line(line: &str) -> (&str, BTreeMap<&str, &str>) {
    let (head, values) = line.split_once(" |").unwrap_or((line, ""));
    let values = values
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    (head.trim_end(), values)
}

/// What a `dump=1` key (hex; `1.` before it: CPU 1's) names; see `note_cpu` in guests/regdiff.c.
fn key_name(key: &str) -> String {
    if let Some(cpu1_key) = key.strip_prefix("1.") {
        return format!("CPU 1's {}", key_name(cpu1_key));
    }
    let Ok(k) = u32::from_str_radix(key, 16) else {
        return key.to_string();
    };
    match k {
        0x1B => "IA32_APIC_BASE".into(),
        0xC8 => "CR8".into(),
        0x6E0 => "IA32_TSC_DEADLINE armed".into(),
        0x1000 => "IOREGSEL".into(),
        0x1100..=0x11FF => format!("IOAPIC register {:#04x}", k - 0x1100),
        0x4D0 | 0x4D1 => format!("ELCR port {k:#x}"),
        0x2000 => "NMIs taken".into(),
        off if off < 0x400 && off % 0x10 == 0 => format!("LAPIC register {off:#05x}"),
        _ => key.to_string(),
    }
}

/// A mode whose transcript differs from the reference's.
#[derive(Clone, Debug)]
pub struct Finding {
    pub case: DiffCase,
    pub mode: IrqchipMode,
    pub divergence: Divergence,
    /// The values that differ after the first diverging operation (empty when the `dump=1`
    /// runs could not say: a run failed, or they did not diverge at the same operation).
    pub values: Vec<ValueDifference>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = &self.divergence;
        writeln!(
            f,
            "seed {} ({} vCPUs): {} mode differs from {} mode at line {}:\n  {}: {}\n  {}: {}",
            self.case.seed,
            self.case.cpus,
            mode_name(self.mode),
            mode_name(REFERENCE),
            d.line,
            mode_name(REFERENCE),
            d.reference,
            mode_name(self.mode),
            d.other
        )?;
        for v in &self.values {
            writeln!(
                f,
                "  {}: {} {}, {} {}",
                v.what,
                mode_name(REFERENCE),
                v.reference,
                mode_name(self.mode),
                v.other
            )?;
        }
        for mode in [REFERENCE, self.mode] {
            let run = DiffRun {
                case: self.case,
                mode,
                dump: true,
            };
            writeln!(f, "  show: {}", run.show_command())?;
        }
        Ok(())
    }
}

/// Why a seed did not pass.
#[derive(Debug)]
pub enum DiffFailure {
    /// A run failed (VMM error, hang, the guest did not finish).
    Run {
        run: DiffRun,
        failure: FuzzFailure,
        output: String,
    },
    /// A mode's transcript differs from the reference's.
    Diverged(Box<Finding>),
}

impl fmt::Display for DiffFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Run {
                run,
                failure,
                output,
            } => write!(
                f,
                "seed {} ({} vCPUs) in {} mode: {failure}\n--- guest output ---\n{output}--- show ---\n{}",
                run.case.seed,
                run.case.cpus,
                mode_name(run.mode),
                run.show_command()
            ),
            Self::Diverged(finding) => write!(f, "{finding}"),
        }
    }
}

fn transcript_of(run: DiffRun, timeout: Duration) -> Result<String, DiffFailure> {
    run.transcript(timeout)
        .map_err(|(failure, output)| DiffFailure::Run {
            run,
            failure,
            output,
        })
}

/// Runs `case` in the reference mode and in each of `modes`, and compares.
pub fn compare_seed(
    case: DiffCase,
    modes: &[IrqchipMode],
    timeout: Duration,
) -> Result<(), DiffFailure> {
    let run = |mode| DiffRun {
        case,
        mode,
        dump: false,
    };
    let reference = transcript_of(run(REFERENCE), timeout)?;
    for &mode in modes.iter().filter(|&&m| m != REFERENCE) {
        let other = transcript_of(run(mode), timeout)?;
        let Some(divergence) = first_divergence(&reference, &other) else {
            continue;
        };
        let values = operation_of(&divergence.reference)
            .map(|op| explain(case, op, mode, timeout))
            .unwrap_or_default();
        return Err(DiffFailure::Diverged(Box::new(Finding {
            case,
            mode,
            divergence,
            values,
        })));
    }
    Ok(())
}

/// The values that differ after operation `op`, from `dump=1` runs that stop there; empty when
/// they cannot tell.
fn explain(case: DiffCase, op: u32, mode: IrqchipMode, timeout: Duration) -> Vec<ValueDifference> {
    let dump = |mode| {
        DiffRun {
            case: DiffCase {
                ops: op + 1,
                ..case
            },
            mode,
            dump: true,
        }
        .transcript(timeout)
        .ok()
    };
    let (Some(reference), Some(other)) = (dump(REFERENCE), dump(mode)) else {
        return Vec::new();
    };
    match first_divergence(&reference, &other) {
        Some(d) if operation_of(&d.reference) == Some(op) => {
            differing_values(&d.reference, &d.other)
        }
        _ => Vec::new(),
    }
}

/// What `irqvm diff-guest` does.
#[derive(Clone, Debug)]
pub struct DiffPlan {
    /// The first seed (later ones count up from it).
    pub first_seed: u64,
    /// Keep going until this much time has passed; `None`: one seed.
    pub duration: Option<Duration>,
    /// The modes compared with the reference.
    pub modes: Vec<IrqchipMode>,
    pub ops: u32,
    pub cpus: u32,
}

/// Runs the plan, printing one line per seed to stdout; returns how many seeds passed, or the
/// first failure.
pub fn run_plan(plan: &DiffPlan) -> Result<u64, DiffFailure> {
    let start = Instant::now();
    let mut seed = plan.first_seed;
    loop {
        let t = Instant::now();
        let case = DiffCase {
            seed,
            ops: plan.ops,
            cpus: plan.cpus,
        };
        compare_seed(case, &plan.modes, RUN_TIMEOUT)?;
        println!(
            "diff-guest: seed {seed}: {} the same as {} ({:.1} s)",
            plan.modes
                .iter()
                .map(|&m| mode_name(m))
                .collect::<Vec<_>>()
                .join(" and "),
            mode_name(REFERENCE),
            t.elapsed().as_secs_f64()
        );
        seed += 1;
        match plan.duration {
            Some(d) if start.elapsed() < d => {}
            _ => return Ok(seed - plan.first_seed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_divergence_is_the_first_differing_line_or_a_missing_one() {
        assert_eq!(first_divergence("a\nb\n", "a\nb\n"), None);
        assert_eq!(
            first_divergence("a\nb\nc\n", "a\nx\nc\n"),
            Some(Divergence {
                line: 2,
                reference: "b".into(),
                other: "x".into()
            })
        );
        assert_eq!(
            first_divergence("a\nb\n", "a\n"),
            Some(Divergence {
                line: 2,
                reference: "b".into(),
                other: String::new()
            })
        );
    }

    #[test]
    fn dump_lines_name_the_registers_that_differ() {
        let kernel = "0017 mmio 350 <- 7096 -> 0 | 1b=fee00900 350=17096 1131=69 2000=0";
        let user = "0017 mmio 350 <- 7096 -> 0 | 1b=fee00900 350=12096 1131=6a 2000=0";
        let found = differing_values(kernel, user);
        let names: Vec<&str> = found.iter().map(|v| v.what.as_str()).collect();
        assert_eq!(names, ["IOAPIC register 0x31", "LAPIC register 0x350"]);
        assert_eq!(
            (found[1].reference.as_str(), found[1].other.as_str()),
            ("17096", "12096")
        );

        let result = differing_values("0003 mmio 30 -> 50014 | 1b=0", "0003 mmio 30 -> 0 | 1b=0");
        assert_eq!(result.len(), 1);
        assert_eq!(result[0].what, "the operation's result");

        let missing = differing_values("0001 eoi -> 0 | 6e0=1", "0001 eoi -> 0 |");
        assert_eq!(missing[0].what, "IA32_TSC_DEADLINE armed");
        assert_eq!(missing[0].other, "(not read)");

        let cpu1 = differing_values(
            "0009 cpu1 eoi -> 0 | 200=0 1.200=10",
            "0009 cpu1 eoi -> 0 | 200=0 1.200=0",
        );
        assert_eq!(cpu1.len(), 1);
        assert_eq!(cpu1[0].what, "CPU 1's LAPIC register 0x200");
    }

    #[test]
    fn transcript_lines_carry_their_operation_number() {
        assert_eq!(operation_of("0042 line 17 high -> 0 s=1234abcd"), Some(42));
        assert_eq!(operation_of("12345 eoi -> 0 s=1234abcd"), Some(12345));
        assert_eq!(
            operation_of("0007 cpu1 eoi -> 0 s=1234abcd/0badf00d"),
            Some(7)
        );
        assert_eq!(operation_of("regdiff seed 1 ops 800"), None);
        assert_eq!(operation_of("PASS: regdiff ran every op"), None);
    }

    #[test]
    fn a_run_has_its_vcpus_and_its_seed_ops_and_dump_on_the_command_line() {
        let run = DiffRun {
            case: DiffCase {
                seed: 7,
                ops: 30,
                cpus: 2,
            },
            mode: IrqchipMode::Split,
            dump: true,
        };
        let cfg = run.config(SerialCapture::new());
        assert_eq!(cfg.cmdline, "seed=7 ops=30 dump=1");
        assert_eq!((cfg.cpus, cfg.irqchip), (2, IrqchipMode::Split));
        let show = run.show_command();
        assert!(show.contains("--cpus 2 --irqchip split --cmdline 'seed=7 ops=30 dump=1'"));
    }
}
