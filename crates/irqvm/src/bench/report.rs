//! Turning the runs into figures: tables (text and markdown), JSON, the docs page.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use super::runner::Peer;
use super::stats::{self, Spread};
use super::{RunKind, Suite};

/// The latency workloads, in table order: (name, what it measures).
pub const WORKLOADS: &[(&str, &str)] = &[
    ("selfipi", "self-IPI: send, take, EOI"),
    (
        "selfipi_tpr",
        "self-IPI held by TPR, released by lowering it",
    ),
    (
        "irq_guest",
        "device line raised by the guest (pc-testdev) to handler",
    ),
    (
        "timer_oneshot",
        "LAPIC one-shot timer: past its programmed expiry",
    ),
    ("timer_deadline", "TSC-deadline timer: past its deadline"),
    ("ipi_halted", "IPI round trip, both vCPUs halted"),
    ("ipi_spin", "IPI round trip, both vCPUs spinning"),
    (
        "irq_host",
        "device line raised by a host thread (irqvm only), host-observed",
    ),
    (
        "irq_host_msi",
        "MSI sent by a host thread (irqvm only), host-observed",
    ),
];

/// The host-driven workloads (`bench_irqhost`), with the label of their rows in the rates table.
const HOST_WORKLOADS: &[(&str, &str)] = &[("irq_host", "line"), ("irq_host_msi", "MSI")];

/// (host workload, hz) → (sent, delivered, elapsed ns), summed over repeats.
pub type RateSteps = BTreeMap<(String, u64), (u64, u64, u64)>;

/// One workload on one peer, over every repeat.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    /// Median latency (ns) of each run.
    pub run_medians: Vec<f64>,
    /// Every sample of every run (ns).
    pub pooled: Vec<f64>,
    pub exits_per_irq: Vec<f64>,
    pub cpu_ns_per_irq: Vec<f64>,
}

impl Cell {
    pub fn median(&self) -> Option<f64> {
        stats::median(&self.run_medians)
    }
}

/// Boot runs of one peer at one vCPU count.
#[derive(Clone, Debug, Default)]
pub struct BootCell {
    pub boot_ns: Vec<f64>,
    pub rss_kib: Vec<f64>,
    pub cpu_ns: Vec<f64>,
}

/// Everything the suite's output is made of.
pub struct Summary<'a> {
    pub suite: &'a Suite,
    /// workload → peer → cell.
    pub cells: BTreeMap<&'static str, BTreeMap<Peer, Cell>>,
    /// vCPU count → peer → boot figures.
    pub boot: BTreeMap<u32, BTreeMap<Peer, BootCell>>,
    /// peer → (host workload, hz) → (sent, delivered, elapsed ns) summed over repeats.
    pub rates: BTreeMap<Peer, RateSteps>,
    problems: Vec<String>,
}

fn workload_key(name: &str) -> Option<&'static str> {
    WORKLOADS.iter().map(|w| w.0).find(|w| *w == name)
}

impl<'a> Summary<'a> {
    pub fn new(suite: &'a Suite) -> Self {
        let mut s = Self {
            suite,
            cells: BTreeMap::new(),
            boot: BTreeMap::new(),
            rates: BTreeMap::new(),
            problems: Vec::new(),
        };
        for run in &suite.runs {
            s.check_run(run);
            match run.kind {
                RunKind::Boot(n) => s.add_boot(run, n),
                _ => s.add_latencies(run),
            }
        }
        s
    }

    fn check_run(&mut self, run: &super::Run) {
        let r = &run.result;
        let what = format!(
            "{} {:?} repeat {}",
            run.peer.name(),
            run.kind,
            run.repeat + 1
        );
        if r.timed_out {
            self.problems.push(format!("{what}: timed out"));
        }
        if r.exit_status != Some(1) {
            self.problems.push(format!(
                "{what}: exit status {:?} (the guest's debug-exit 0 gives 1)",
                r.exit_status
            ));
        }
        if !r.output.done {
            self.problems.push(format!("{what}: no DONE line"));
        }
        for f in &r.output.failures {
            self.problems.push(format!("{what}: FAIL: {f}"));
        }
        for (name, w) in &r.output.workloads {
            if w.counted != w.sent {
                self.problems.push(format!(
                    "{what}: {name} sent {} but counted {}",
                    w.sent, w.counted
                ));
            }
        }
        if run.kind == RunKind::HostIrq && r.output.host_count != r.output.host_sent {
            // Open-loop pulses may merge (edge-triggered, not yet taken): only the closed loop
            // must count exactly; the totals are reported.
            let lost = r
                .output
                .rates
                .iter()
                .map(|p| p.sent - p.delivered.min(p.sent))
                .sum::<u64>();
            let expect = r.output.host_sent.map(|s| s - lost);
            if r.output.host_count != expect {
                self.problems.push(format!(
                    "{what}: the host sent {:?} ({lost} merged at fixed rates), the guest counted {:?}",
                    r.output.host_sent, r.output.host_count
                ));
            }
        }
        let expected: &[&str] = match run.kind {
            RunKind::Latency => &[
                "selfipi",
                "selfipi_tpr",
                "irq_guest",
                "timer_oneshot",
                "ipi_halted",
                "ipi_spin",
            ],
            RunKind::HostIrq => &["irq_host", "irq_host_msi"],
            RunKind::Boot(_) => &["boot"],
        };
        for name in expected {
            if !r.output.workloads.contains_key(*name) {
                self.problems
                    .push(format!("{what}: workload {name} missing"));
            }
        }
    }

    fn add_latencies(&mut self, run: &super::Run) {
        let r = &run.result;
        for (name, w) in &r.output.workloads {
            let Some(key) = workload_key(name) else {
                continue;
            };
            let ns: Vec<f64> = if w.host_ns.is_empty() {
                w.cycles
                    .iter()
                    .map(|&c| c as f64 * 1e9 / self.suite.tsc_hz - w.offset_ns)
                    .collect()
            } else {
                w.host_ns.clone()
            };
            let cell = self
                .cells
                .entry(key)
                .or_default()
                .entry(run.peer)
                .or_default();
            if let Some(m) = stats::median(&ns) {
                cell.run_medians.push(m);
            }
            cell.pooled.extend(&ns);
            let irqs = w.interrupts.max(1) as f64;
            let (exits, cpu) = match w.host_cost {
                Some((e, c)) => (Some(e), Some(c)),
                None => (r.output.phase_exits(name), r.phase_cpu_ns(name)),
            };
            if let Some(e) = exits {
                cell.exits_per_irq.push(e as f64 / irqs);
            }
            if let Some(c) = cpu {
                cell.cpu_ns_per_irq.push(c as f64 / irqs);
            }
        }
        for p in &r.output.rates {
            let e = self
                .rates
                .entry(run.peer)
                .or_default()
                .entry((p.name.clone(), p.hz))
                .or_default();
            e.0 += p.sent;
            e.1 += p.delivered;
            e.2 += p.elapsed_ns;
        }
    }

    fn add_boot(&mut self, run: &super::Run, cpus: u32) {
        let r = &run.result;
        let cell = self
            .boot
            .entry(cpus)
            .or_default()
            .entry(run.peer)
            .or_default();
        if let Some(w) = r.output.workloads.get("boot") {
            let last = w.cycles.last().copied().unwrap_or(0);
            cell.boot_ns.push(last as f64 * 1e9 / self.suite.tsc_hz);
        }
        cell.rss_kib.push(r.max_rss_kib as f64);
        cell.cpu_ns.push(r.cpu_total_ns as f64);
    }

    pub fn problems(&self) -> Vec<String> {
        self.problems.clone()
    }

    /// Resident memory per vCPU: slope of the peak RSS (median per count) against the count.
    pub fn rss_per_vcpu_kib(&self, peer: Peer) -> Option<f64> {
        let points: Vec<(f64, f64)> = self
            .boot
            .iter()
            .filter_map(|(n, peers)| {
                Some((f64::from(*n), stats::median(&peers.get(&peer)?.rss_kib)?))
            })
            .collect();
        stats::slope(&points)
    }

    /// The smallest median of `workload` among `peers` (the fastest peer).
    fn fastest(&self, workload: &str, peers: impl Iterator<Item = Peer>) -> Option<f64> {
        let cells = self.cells.get(workload)?;
        peers
            .filter_map(|p| cells.get(&p)?.median())
            .filter(|m| *m > 0.0)
            .min_by(f64::total_cmp)
    }

    /// The tables, each as (title, header, rows).
    pub fn tables(&self) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
        let peers = &self.suite.peers;
        let mut header = vec!["workload".to_string()];
        header.extend(peers.iter().map(Peer::name));
        let mut out = Vec::new();

        let mut rows = Vec::new();
        for (name, _) in WORKLOADS {
            let Some(cells) = self.cells.get(name) else {
                continue;
            };
            let irqvm_only = cells.keys().all(Peer::is_irqvm);
            let best = self.fastest(name, peers.iter().copied());
            let mut row = vec![if irqvm_only {
                format!("{name} (irqvm only)")
            } else {
                name.to_string()
            }];
            for p in peers {
                row.push(match (cells.get(p), best) {
                    (Some(c), Some(best)) if c.median().is_some() => {
                        let m = c.median().unwrap_or(0.0);
                        let sp = Spread::of(&c.pooled);
                        let (lo, hi) = sp.map_or((m, m), |s| (s.p10, s.p90));
                        format!("{} [{}–{}] ×{:.2}", us(m), us(lo), us(hi), m / best)
                    }
                    _ => "—".into(),
                });
            }
            rows.push(row);
        }
        out.push((
            "Latency: median µs of the per-run medians [p10–p90 of all samples] ×ratio to the fastest peer".into(),
            header.clone(),
            rows,
        ));

        let mut rows = Vec::new();
        for (name, _) in WORKLOADS {
            let Some(cells) = self.cells.get(name) else {
                continue;
            };
            let mut row = vec![name.to_string()];
            for p in peers {
                row.push(match cells.get(p) {
                    Some(c) => {
                        let exits = stats::median(&c.exits_per_irq)
                            .map_or("n/a".into(), |e| format!("{e:.1}"));
                        let cpu = stats::median(&c.cpu_ns_per_irq).map_or("—".into(), us);
                        format!("{exits} exits, {cpu} µs CPU")
                    }
                    None => "—".into(),
                });
            }
            rows.push(row);
        }
        let mut rss_row = vec!["resident memory per vCPU".to_string()];
        for p in peers {
            rss_row.push(
                self.rss_per_vcpu_kib(*p)
                    .map_or("—".into(), |k| format!("{k:.0} KiB")),
            );
        }
        rows.push(rss_row);
        out.push((
            "VMM cost per delivered interrupt: userspace exits (irqvm only; n/a under QEMU) and host CPU time of the VMM process".into(),
            header.clone(),
            rows,
        ));

        let mut rows = Vec::new();
        for (n, cells) in &self.boot {
            let best = peers
                .iter()
                .filter_map(|p| stats::median(&cells.get(p)?.boot_ns))
                .filter(|m| *m > 0.0)
                .min_by(f64::total_cmp);
            let mut row = vec![format!("{n} vCPU")];
            for p in peers {
                row.push(match cells.get(p) {
                    Some(c) => {
                        let t = stats::median(&c.boot_ns).unwrap_or(0.0);
                        let rss = stats::median(&c.rss_kib).unwrap_or(0.0) / 1024.0;
                        let ratio = best.map_or(String::new(), |b| format!(" ×{:.2}", t / b));
                        if *n == 1 {
                            format!("— ({rss:.1} MiB)")
                        } else {
                            format!("{}{ratio} ({rss:.1} MiB)", us(t))
                        }
                    }
                    None => "—".into(),
                });
            }
            rows.push(row);
        }
        out.push((
            "AP bring-up: µs from the first INIT to all APs online ×ratio (peak RSS of the VMM)"
                .into(),
            header.clone(),
            rows,
        ));

        let mut rows = Vec::new();
        let irqvm_peers: Vec<Peer> = peers.iter().copied().filter(Peer::is_irqvm).collect();
        for (workload, label) in HOST_WORKLOADS {
            let all_hz: std::collections::BTreeSet<u64> = self
                .rates
                .values()
                .flat_map(|m| m.keys())
                .filter(|(w, _)| w == workload)
                .map(|(_, hz)| *hz)
                .collect();
            for hz in all_hz {
                let mut row = vec![format!("{label} {hz} Hz")];
                for p in &irqvm_peers {
                    let key = (workload.to_string(), hz);
                    row.push(match self.rates.get(p).and_then(|m| m.get(&key)) {
                        Some((sent, delivered, _)) => format!("{delivered}/{sent} delivered"),
                        None => "—".into(),
                    });
                }
                rows.push(row);
            }
            let Some(cells) = self.cells.get(workload) else {
                continue;
            };
            let mut sat = vec![format!("{label} saturation (closed loop)")];
            for p in &irqvm_peers {
                let m = cells.get(p).and_then(Cell::median);
                sat.push(m.map_or("—".into(), |m| format!("{:.0} /s", 1e9 / m)));
            }
            rows.push(sat);
        }
        let mut h = vec!["rate".to_string()];
        h.extend(irqvm_peers.iter().map(Peer::name));
        out.push((
            "Device interrupts from a host thread, by line (`irq_host`) and by MSI (`irq_host_msi`) (irqvm only: QEMU has no such thread, no ratio against it)".into(),
            h,
            rows,
        ));
        out
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        for (title, header, rows) in self.tables() {
            let _ = writeln!(s, "\n== {title}");
            let widths: Vec<usize> = (0..header.len())
                .map(|i| {
                    rows.iter()
                        .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                        .chain([header[i].chars().count()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: &[String]| {
                let padded: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}", w = *w))
                    .collect();
                padded.join("  ")
            };
            let _ = writeln!(s, "{}", line(&header));
            for r in &rows {
                let _ = writeln!(s, "{}", line(r));
            }
        }
        for n in &self.suite.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(
            s,
            "host TSC {:.3} GHz; {} runs in {:.1} s",
            self.suite.tsc_hz / 1e9,
            self.suite.runs.len(),
            self.suite.elapsed.as_secs_f64()
        );
        s
    }

    pub fn markdown_tables(&self) -> String {
        let mut s = String::new();
        for (title, header, rows) in self.tables() {
            let _ = writeln!(s, "#### {title}\n");
            let _ = writeln!(s, "| {} |", header.join(" | "));
            let _ = writeln!(s, "|{}", "---|".repeat(header.len()));
            for r in rows {
                let _ = writeln!(s, "| {} |", r.join(" | "));
            }
            s.push('\n');
        }
        s
    }

    pub fn json(&self) -> Value {
        let peers: Vec<String> = self.suite.peers.iter().map(Peer::name).collect();
        let spread = |v: &[f64]| {
            Spread::of(v).map_or(Value::Null, |s| {
                json!({"median": s.median, "min": s.min, "max": s.max, "p10": s.p10, "p90": s.p90, "n": s.n})
            })
        };
        let mut latency = serde_json::Map::new();
        for (name, cells) in &self.cells {
            let mut per = serde_json::Map::new();
            for (p, c) in cells {
                per.insert(
                    p.name(),
                    json!({
                        "median_ns": c.median(),
                        "run_medians_ns": spread(&c.run_medians),
                        "samples_ns": spread(&c.pooled),
                        "exits_per_interrupt": spread(&c.exits_per_irq),
                        "cpu_ns_per_interrupt": spread(&c.cpu_ns_per_irq),
                    }),
                );
            }
            latency.insert(name.to_string(), Value::Object(per));
        }
        let mut boot = serde_json::Map::new();
        for (n, cells) in &self.boot {
            let mut per = serde_json::Map::new();
            for (p, c) in cells {
                per.insert(
                    p.name(),
                    json!({"boot_ns": spread(&c.boot_ns), "max_rss_kib": spread(&c.rss_kib), "cpu_ns": spread(&c.cpu_ns)}),
                );
            }
            boot.insert(n.to_string(), Value::Object(per));
        }
        let rss: serde_json::Map<String, Value> = self
            .suite
            .peers
            .iter()
            .map(|p| (p.name(), json!(self.rss_per_vcpu_kib(*p))))
            .collect();
        let rates: serde_json::Map<String, Value> = self
            .rates
            .iter()
            .map(|(p, m)| {
                let steps: Vec<Value> = m
                    .iter()
                    .map(|((w, hz), (s, d, e))| json!({"workload": w, "hz": hz, "sent": s, "delivered": d, "elapsed_ns": e}))
                    .collect();
                (p.name(), Value::Array(steps))
            })
            .collect();
        let plan = &self.suite.plan;
        json!({
            "command": self.suite.command,
            "machine": machine(),
            "host_tsc_hz": self.suite.tsc_hz,
            "plan": {"quick": plan.quick, "repeats": plan.repeats, "iterations": plan.iterations,
                     "boot_cpus": plan.boot_cpus, "rates_hz": plan.rates, "host_pulses": plan.pulses},
            "peers": peers,
            "latency": latency,
            "boot": boot,
            "rss_per_vcpu_kib": rss,
            "host_rates": rates,
            "notes": self.suite.notes,
            "problems": self.problems,
            "elapsed_s": self.suite.elapsed.as_secs_f64(),
        })
    }
}

/// ns as µs with 3 significant-ish digits.
fn us(ns: f64) -> String {
    let u = ns / 1000.0;
    if u.abs() >= 100.0 {
        format!("{u:.0}")
    } else if u.abs() >= 10.0 {
        format!("{u:.1}")
    } else {
        format!("{u:.2}")
    }
}

/// CPU model, core count and kernel of this machine.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, m)| m.trim())
        })
        .unwrap_or("unknown CPU")
        .to_string();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let uname = std::process::Command::new("uname")
        .arg("-srvm")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{model}, {cpus} CPUs; {uname}")
}

const BEGIN: &str = "<!-- irqvm bench: generated section begin -->";
const END: &str = "<!-- irqvm bench: generated section end -->";

/// Writes the generated section of `dir/benchmarks.md` (the rest of the page, written by hand, is
/// kept), showing `files`, the plots already written into `dir/bench/`.
pub fn write_docs(dir: &Path, summary: &Summary<'_>, files: Vec<String>) -> std::io::Result<()> {
    let mut section = String::new();
    let _ = writeln!(section, "{BEGIN}\n");
    let _ = writeln!(
        section,
        "Command: `{}` ({:.0} s, {} runs)\n",
        summary.suite.command,
        summary.suite.elapsed.as_secs_f64(),
        summary.suite.runs.len()
    );
    let _ = writeln!(
        section,
        "Machine: {}; host TSC {:.3} GHz\n",
        machine(),
        summary.suite.tsc_hz / 1e9
    );
    for n in &summary.suite.notes {
        let _ = writeln!(section, "Note: {n}\n");
    }
    section.push_str(&summary.markdown_tables());
    for f in files {
        let _ = writeln!(section, "![{f}](bench/{f})\n");
    }
    let _ = writeln!(section, "{END}");
    let page = dir.join("benchmarks.md");
    let old = std::fs::read_to_string(&page).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{}{}",
            &old[..b],
            section.trim_end(),
            &old[e + END.len()..]
        ),
        _ if old.is_empty() => format!("# irqvm benchmarks\n\n{section}"),
        _ => format!("{old}\n{section}"),
    };
    std::fs::write(page, new)
}
