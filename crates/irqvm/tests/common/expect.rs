//! What each guest must print. `crates/irqvm/guests/expect/NAME.txt` lists every check guest
//! NAME prints, by exact name, with its outcome in each irqchip mode and the vCPU counts it is
//! printed on (the format is in guests/README.md, "Expected outcomes"). [`Expectations::verify`]
//! compares a run's serial output with it and lists every difference: a SKIP or FAIL where a
//! PASS is expected, a check that is missing or not listed, a check printed twice, a tolerated
//! host limit that now passes (the line is stale), and a DONE line that disagrees with the
//! PASS/FAIL lines. So a guest cannot pass by skipping: whatever it does not run fails the test.
//! A check whose name carries the tag `[amd]` or `[intel]` is expected only on a host of that
//! vendor (the guest's CPUID shows the host's vendor, and the guest chooses its checks by it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use irqvm::IrqchipMode;

/// Where the expectation files are.
pub const EXPECT_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/guests/expect");

/// The modes in the order of the files' outcome columns.
pub const MODES: [IrqchipMode; 3] = [IrqchipMode::User, IrqchipMode::Split, IrqchipMode::Kernel];

/// The outcome a check must have in one mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// `pass`: the check prints PASS.
    Pass,
    /// `skip`: the check prints SKIP: the guest cannot run it in this configuration (one CPU,
    /// an MSR the host does not have).
    Skip,
    /// `fail`: a known host limit; the check prints FAIL. A PASS is an error too: the limit is
    /// gone and the line must be changed to `pass`.
    Fail,
    /// `flaky`: a host limit that depends on timing; PASS or FAIL (never SKIP), reported.
    Flaky,
    /// `-`: the guest is not run in this mode at all (it needs an option the mode refuses, as
    /// `protected_aps` needs `--protected-state-aps`, which only `user` mode takes). A column is
    /// all `-` or has none.
    NotRun,
}

impl Expect {
    fn parse(word: &str) -> Option<Self> {
        Some(match word {
            "pass" => Self::Pass,
            "skip" => Self::Skip,
            "fail" => Self::Fail,
            "flaky" => Self::Flaky,
            "-" => Self::NotRun,
            _ => return None,
        })
    }
}

/// What a run printed for one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    Pass,
    Fail,
    Skip,
}

/// One `PASS:`, `FAIL:` or `SKIP:` line of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Printed {
    pub seen: Seen,
    pub name: String,
    /// What follows the name on a FAIL or SKIP line.
    pub detail: String,
}

/// The check lines of `output`, in order. Check names contain no colon (guests/README.md), so a
/// FAIL or SKIP line's name ends at its first ": ".
pub fn printed_checks(output: &str) -> Vec<Printed> {
    output
        .lines()
        .filter_map(|line| {
            let (seen, rest) = if let Some(rest) = line.strip_prefix("PASS: ") {
                return Some(Printed {
                    seen: Seen::Pass,
                    name: rest.trim_end().to_string(),
                    detail: String::new(),
                });
            } else if let Some(rest) = line.strip_prefix("FAIL: ") {
                (Seen::Fail, rest)
            } else {
                (Seen::Skip, line.strip_prefix("SKIP: ")?)
            };
            let (name, detail) = rest.split_once(": ").unwrap_or((rest, ""));
            Some(Printed {
                seen,
                name: name.trim_end().to_string(),
                detail: detail.to_string(),
            })
        })
        .collect()
}

/// The counts of the `DONE: <n> passed, <m> failed` line.
pub fn done_counts(output: &str) -> Option<(usize, usize)> {
    let line = output.lines().find_map(|l| l.strip_prefix("DONE: "))?;
    let (passed, failed) = line.split_once(" passed, ")?;
    let failed = failed.strip_suffix(" failed")?;
    Some((passed.parse().ok()?, failed.parse().ok()?))
}

/// One line of an expectation file.
#[derive(Clone, Debug)]
struct Line {
    cpus: Vec<u32>,
    outcome: [Expect; 3],
    name: String,
}

/// The expected outcome of every check of one guest.
#[derive(Clone, Debug)]
pub struct Expectations {
    guest: String,
    lines: Vec<Line>,
}

/// The checks of a run that met a tolerated host limit (`fail` and `flaky` lines that failed).
#[derive(Debug, Default)]
pub struct Verdict {
    pub tolerated: Vec<String>,
}

fn mode_column(mode: IrqchipMode) -> usize {
    MODES
        .iter()
        .position(|&m| m == mode)
        .expect("every mode has a column")
}

impl Expectations {
    /// Reads guests/expect/`guest`.txt; panics with the file and line on any error in it.
    pub fn load(guest: &str) -> Self {
        let path = format!("{EXPECT_DIR}/{guest}.txt");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{path}: {e} (every guest needs one: see guests/README.md, \"Expected outcomes\")"
            )
        });
        Self::parse(guest, &text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Parses the text of an expectation file. `Err` says what is wrong, and on which line.
    pub fn parse(guest: &str, text: &str) -> Result<Self, String> {
        let mut lines: Vec<Line> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let raw = raw.trim();
            if raw.is_empty() || raw.starts_with('#') {
                continue;
            }
            let line = parse_line(raw).map_err(|e| format!("line {}: {e}", i + 1))?;
            let clash = lines
                .iter()
                .any(|l| l.name == line.name && l.cpus.iter().any(|c| line.cpus.contains(c)));
            if clash {
                return Err(format!(
                    "line {}: {:?} is listed twice for the same vCPU count",
                    i + 1,
                    line.name
                ));
            }
            lines.push(line);
        }
        for mode in MODES {
            let column = mode_column(mode);
            let not_run = lines
                .iter()
                .filter(|l| l.outcome[column] == Expect::NotRun)
                .count();
            if not_run == lines.len() && mode != IrqchipMode::User {
                continue;
            }
            if not_run > 0 {
                return Err(format!(
                    "`-` in {mode:?} mode: a column is all `-` (the guest is not run in that \
                     mode; user mode runs every guest) or has none"
                ));
            }
            if !lines.iter().any(|l| l.outcome[column] == Expect::Pass) {
                return Err(format!(
                    "no check must pass in {mode:?} mode: such a test would pass by skipping"
                ));
            }
        }
        Ok(Self {
            guest: guest.to_string(),
            lines,
        })
    }

    /// Whether the guest runs in `mode` (its column is not all `-`).
    pub fn runs_in(&self, mode: IrqchipMode) -> bool {
        let column = mode_column(mode);
        self.lines
            .iter()
            .any(|l| l.outcome[column] != Expect::NotRun)
    }

    /// The vCPU counts the guest is run on: every count a line names.
    pub fn cpu_counts(&self) -> Vec<u32> {
        let mut counts: Vec<u32> = self.lines.iter().flat_map(|l| l.cpus.clone()).collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    }

    /// The expected outcome of every check printed in `mode` on `cpus` vCPUs on a host of
    /// `vendor`, by name.
    pub fn for_run(&self, mode: IrqchipMode, cpus: u32, vendor: Vendor) -> BTreeMap<&str, Expect> {
        let column = mode_column(mode);
        self.lines
            .iter()
            .filter(|l| l.cpus.contains(&cpus) && applies_to(&l.name, vendor))
            .map(|l| (l.name.as_str(), l.outcome[column]))
            .collect()
    }

    /// Compares `output` (a run in `mode` on `cpus` vCPUs on this host) with the expectations.
    /// `Err` lists every difference, one per line.
    pub fn verify(&self, mode: IrqchipMode, cpus: u32, output: &str) -> Result<Verdict, String> {
        self.verify_on(mode, cpus, output, host_vendor())
    }

    /// [`Expectations::verify`] for a run on a host of `vendor`.
    pub fn verify_on(
        &self,
        mode: IrqchipMode,
        cpus: u32,
        output: &str,
        vendor: Vendor,
    ) -> Result<Verdict, String> {
        let expected = self.for_run(mode, cpus, vendor);
        let file = format!("guests/expect/{}.txt", self.guest);
        let mut problems = Vec::new();
        if !self.runs_in(mode) {
            problems.push(format!(
                "{file} says the guest is not run in {mode:?} mode (`-`)"
            ));
        }
        if expected.is_empty() {
            problems.push(format!("{file} lists no check for {cpus} vCPU(s)"));
        }
        let printed = printed_checks(output);
        let mut verdict = Verdict::default();
        let mut times: BTreeMap<&str, usize> = BTreeMap::new();
        for p in &printed {
            *times.entry(p.name.as_str()).or_default() += 1;
            match expected.get(p.name.as_str()) {
                None => problems.push(format!(
                    "unexpected check {} {:?} (not in {file} for {cpus} vCPU(s))",
                    seen_word(p.seen),
                    p.name
                )),
                Some(&want) => {
                    if let Some(problem) = judge(want, p, &file, mode) {
                        problems.push(problem);
                    } else if p.seen == Seen::Fail {
                        verdict.tolerated.push(format!("{}: {}", p.name, p.detail));
                    }
                }
            }
        }
        for (name, n) in &times {
            if *n > 1 {
                problems.push(format!("{name:?} printed {n} times"));
            }
        }
        for (name, want) in &expected {
            if !times.contains_key(name) {
                problems.push(format!("missing check {name:?} (expected {want:?})"));
            }
        }
        problems.extend(done_problem(&printed, output));
        if problems.is_empty() {
            Ok(verdict)
        } else {
            let mut text = String::new();
            for p in &problems {
                let _ = writeln!(text, "  - {p}");
            }
            Err(text)
        }
    }
}

/// The host CPU's vendor, as far as the vendor tags of check names go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vendor {
    Amd,
    Intel,
    Other,
}

/// This host's vendor, from /proc/cpuinfo (Hygon's CPUs follow AMD's architecture).
pub fn host_vendor() -> Vendor {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let id = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("vendor_id")?.split(':').nth(1))
        .map(str::trim);
    vendor_of(id.unwrap_or(""))
}

fn vendor_of(vendor_id: &str) -> Vendor {
    match vendor_id {
        "AuthenticAMD" | "HygonGenuine" => Vendor::Amd,
        "GenuineIntel" => Vendor::Intel,
        _ => Vendor::Other,
    }
}

/// Whether a check named `name` is expected on a host of `vendor`: one tagged `[amd]` only on
/// AMD, one tagged `[intel]` only on Intel, any other everywhere.
fn applies_to(name: &str, vendor: Vendor) -> bool {
    if name.contains("[amd]") {
        vendor == Vendor::Amd
    } else if name.contains("[intel]") {
        vendor == Vendor::Intel
    } else {
        true
    }
}

/// Parses `CPUS USER SPLIT KERNEL CHECK NAME...`.
fn parse_line(raw: &str) -> Result<Line, String> {
    let mut rest = raw;
    let mut fields = Vec::with_capacity(4);
    for _ in 0..4 {
        let t = rest.trim_start();
        let end = t
            .find(char::is_whitespace)
            .ok_or("expected: CPUS USER SPLIT KERNEL CHECK-NAME")?;
        fields.push(&t[..end]);
        rest = &t[end..];
    }
    let name = rest.trim();
    if name.contains(':') {
        return Err(format!("{name:?}: check names contain no colon"));
    }
    let cpus = fields[0]
        .split(',')
        .map(|c| c.parse::<u32>().ok().filter(|&n| n > 0))
        .collect::<Option<Vec<u32>>>()
        .ok_or_else(|| format!("{:?}: vCPU counts look like 1,2,4", fields[0]))?;
    let mut outcome = [Expect::Pass; 3];
    for (slot, word) in outcome.iter_mut().zip(&fields[1..]) {
        *slot = Expect::parse(word)
            .ok_or_else(|| format!("{word:?}: an outcome is pass, skip, fail, flaky or -"))?;
    }
    Ok(Line {
        cpus,
        outcome,
        name: name.to_string(),
    })
}

fn seen_word(seen: Seen) -> &'static str {
    match seen {
        Seen::Pass => "PASS",
        Seen::Fail => "FAIL",
        Seen::Skip => "SKIP",
    }
}

/// `None` if `p` is what `want` allows, else the difference.
fn judge(want: Expect, p: &Printed, file: &str, mode: IrqchipMode) -> Option<String> {
    let ok = match want {
        Expect::Pass => p.seen == Seen::Pass,
        Expect::Skip => p.seen == Seen::Skip,
        Expect::Fail => p.seen == Seen::Fail,
        Expect::Flaky => p.seen != Seen::Skip,
        Expect::NotRun => false,
    };
    if ok {
        return None;
    }
    if want == Expect::Fail && p.seen == Seen::Pass {
        return Some(format!(
            "{:?} PASSES although {file} lists it as a host limit (`fail`) in {mode:?} mode: \
             the tolerance is stale, make it `pass`",
            p.name
        ));
    }
    let detail = if p.detail.is_empty() {
        String::new()
    } else {
        format!(": {}", p.detail)
    };
    Some(format!(
        "{} {:?}{detail} (expected {want:?})",
        seen_word(p.seen),
        p.name
    ))
}

/// The guest's own DONE line must exist and count exactly the PASS and FAIL lines printed (a
/// check line lost or garbled on the way shows here).
fn done_problem(printed: &[Printed], output: &str) -> Option<String> {
    let count = |seen| printed.iter().filter(|p| p.seen == seen).count();
    let lines = (count(Seen::Pass), count(Seen::Fail));
    match done_counts(output) {
        None => Some("no DONE line".to_string()),
        Some(done) if done != lines => Some(format!(
            "DONE says {} passed, {} failed, but {} PASS and {} FAIL lines were printed",
            done.0, done.1, lines.0, lines.1
        )),
        Some(_) => None,
    }
}

/// The guests that exist: every `guests/*.c` but the `bench_*` programs, which the benchmark
/// harness drives and measures (they are not pass/fail tests).
pub fn all_guests() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/guests");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".c")?;
            (!stem.starts_with("bench_")).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}
