//! Turning the [`Summary`] into output: tables (text and markdown), JSON, the docs page (with
//! the plots of `plot.rs`).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::perfstat::{KERNEL_APIC_ACCESSES, SYSCALLS, SYSCALL_KINDS, USERSPACE_EXITS};
use crate::plot;
use crate::runner::Peer;
use crate::stats::{self, Spread};
use crate::summary::{
    Cell, Summary, Table, BOOT_PHASES, EXIT_REASONS, FLOORS, HOST_WORKLOADS, WORKLOADS,
};

impl Summary<'_> {
    /// The tables, each as (title, header, rows).
    pub fn tables(&self) -> Vec<Table> {
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
                row.push(cells.get(p).map_or("—".into(), cost_cell));
            }
            row.push(
                FLOORS
                    .iter()
                    .find(|f| f.0 == *name)
                    .map_or("—".into(), |(_, n, what)| format!("{n:.0} ({what})")),
            );
            rows.push(row);
        }
        // A `--boot-only` run has no per-interrupt costs: no table (its bring-up table has the
        // memory per vCPU).
        if !self.cells.is_empty() {
            let mut rss_row = self.rss_per_vcpu_row();
            rss_row.push("—".into());
            rows.push(rss_row);
        }
        let mut cost_header = header.clone();
        cost_header.push("floor: exits any VMM without APIC virtualisation takes".into());
        out.push((
            "VMM cost per delivered interrupt: exits to userspace [by reason, irqvm's counters; perf's count under QEMU], APIC accesses KVM emulated in the kernel, syscalls of the VMM process [by kind, perf], its host CPU time".into(),
            cost_header,
            rows,
        ));

        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        out.push(self.floor_table(host_cpus));

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
        if !rows.is_empty() {
            rows.push(self.rss_per_vcpu_row());
        }
        out.push((
            "AP bring-up: µs from the first INIT to all APs online ×ratio (peak RSS of the VMM)"
                .into(),
            header.clone(),
            rows,
        ));
        out.push((
            "AP bring-up by phase: median µs per AP of send (BSP's loop and INIT write) / wake (to the AP's first instruction: SIPI write, INIT and SIPI taken) / ap (trampoline, C entry, local APIC set-up) / notice (AP online → BSP sees it)".into(),
            header.clone(),
            self.boot_phase_rows(),
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
                        Some((sent, delivered, _, cpu)) => format!(
                            "{delivered}/{sent} delivered, {} µs CPU/irq",
                            us(*cpu as f64 / (*delivered).max(1) as f64)
                        ),
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
            "Device interrupts from a host thread, by line (`irq_host`) and by MSI (`irq_host_msi`), with the VMM's host CPU time per delivered interrupt at each offered rate (irqvm only: QEMU has no such thread, no ratio against it)".into(),
            h,
            rows,
        ));
        out
    }

    /// Resident memory per vCPU, each peer's slope of peak RSS against the vCPU count.
    fn rss_per_vcpu_row(&self) -> Vec<String> {
        let mut row = vec!["resident memory per vCPU".to_string()];
        for p in &self.suite.peers {
            row.push(
                self.rss_per_vcpu_kib(*p)
                    .map_or("—".into(), |k| format!("{k:.0} KiB")),
            );
        }
        row
    }

    /// One row per vCPU count (from 2): each peer's median µs per AP of every boot phase.
    fn boot_phase_rows(&self) -> Vec<Vec<String>> {
        let peers = &self.suite.peers;
        let mut rows = Vec::new();
        for (n, cells) in self.boot.iter().filter(|(n, _)| **n > 1) {
            let mut row = vec![format!("{n} vCPU")];
            for p in peers {
                let medians: Option<Vec<String>> = cells.get(p).and_then(|c| {
                    BOOT_PHASES
                        .iter()
                        .map(|(phase, _)| stats::median(c.phases.get(phase)?).map(us))
                        .collect()
                });
                row.push(medians.map_or("—".into(), |m| m.join(" / ")));
            }
            rows.push(row);
        }
        rows
    }

    pub fn text(&self) -> String {
        let mut s = String::new();
        for (title, header, rows) in self.tables().into_iter().filter(|t| !t.2.is_empty()) {
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
            "host load average {} at the start, {} at the end",
            self.suite.load_start, self.suite.load_end
        );
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
        for (title, header, rows) in self.tables().into_iter().filter(|t| !t.2.is_empty()) {
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
                        "per_interrupt": c.per_irq.iter().map(|(k, v)| (k.clone(), spread(v))).collect::<serde_json::Map<String, Value>>(),
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
                    json!({"boot_ns": spread(&c.boot_ns), "max_rss_kib": spread(&c.rss_kib), "cpu_ns": spread(&c.cpu_ns),
                           "phases_ns_per_ap": c.phases.iter().map(|(k, v)| (k.to_string(), spread(v))).collect::<serde_json::Map<String, Value>>()}),
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
                    .map(|((w, hz), (s, d, e, c))| json!({"workload": w, "hz": hz, "sent": s, "delivered": d, "elapsed_ns": e, "cpu_ns": c}))
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
                     "boot_cpus": plan.boot_cpus, "large_boot_cpus": plan.large_boot_cpus, "rates_hz": plan.rates, "host_pulses": plan.pulses},
            "peers": peers,
            "latency": latency,
            "boot": boot,
            "rss_per_vcpu_kib": rss,
            "host_rates": rates,
            "notes": self.suite.notes,
            "problems": self.problems(),
            "elapsed_s": self.suite.elapsed.as_secs_f64(),
        })
    }
}

/// `name a, name b` for the figures of `keys` in `cell` that are not about zero.
fn breakdown(cell: &Cell, keys: &[(&str, &str)]) -> String {
    let parts: Vec<String> = keys
        .iter()
        .filter_map(|(key, short)| {
            let v = cell.per_irq(key)?;
            (v >= 0.05).then(|| format!("{short} {v:.1}"))
        })
        .collect();
    parts.join(", ")
}

/// One peer's cost of one workload: exits (by reason), in-kernel APIC accesses, syscalls (by
/// kind), CPU time.
fn cost_cell(c: &Cell) -> String {
    let exits = match (stats::median(&c.exits_per_irq), c.per_irq(USERSPACE_EXITS)) {
        (Some(e), _) => match breakdown(c, EXIT_REASONS) {
            b if b.is_empty() => format!("{e:.1} exits"),
            b => format!("{e:.1} exits [{b}]"),
        },
        (None, Some(e)) => format!("{e:.1} exits"),
        (None, None) => "n/a exits".into(),
    };
    let apic = c
        .per_irq(KERNEL_APIC_ACCESSES)
        .filter(|a| *a >= 0.05)
        .map_or(String::new(), |a| format!(", {a:.1} in-kernel APIC"));
    let sys = match (c.per_irq(SYSCALLS), breakdown(c, SYSCALL_KINDS)) {
        (None, _) => ", n/a syscalls".into(),
        (Some(n), b) if b.is_empty() => format!(", {n:.1} syscalls"),
        (Some(n), b) => format!(", {n:.1} syscalls [{b}]"),
    };
    let cpu = stats::median(&c.cpu_ns_per_irq).map_or("—".into(), us);
    format!("{exits}{apic}{sys}, {cpu} µs CPU")
}

/// ns as µs with 3 significant-ish digits.
pub fn us(ns: f64) -> String {
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
/// The markers of a `--boot-only` run's section (the AP bring-up part, with `--large` up to
/// 1024 vCPUs): it has a place of its own, so that it does not replace a full run's figures.
const BOOT_BEGIN: &str = "<!-- irqvm bench --boot-only: generated section begin -->";
const BOOT_END: &str = "<!-- irqvm bench --boot-only: generated section end -->";

/// Writes the plots into `dir/bench/` and the generated section of `dir/benchmarks.md` (the rest
/// of the page, written by hand, is kept).
pub fn write_docs(dir: &Path, summary: &Summary<'_>) -> std::io::Result<()> {
    let plots = dir.join("bench");
    std::fs::create_dir_all(&plots)?;
    let files = plot::write_all(&plots, summary)?;
    let (begin, end) = if summary.suite.plan.boot_only {
        (BOOT_BEGIN, BOOT_END)
    } else {
        (BEGIN, END)
    };
    let mut section = String::new();
    let _ = writeln!(section, "{begin}\n");
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
    let _ = writeln!(
        section,
        "Host load average (1, 5, 15 min; 2 CPUs shared with other work): {} at the start, {} at the end\n",
        summary.suite.load_start, summary.suite.load_end
    );
    for n in &summary.suite.notes {
        let _ = writeln!(section, "Note: {n}\n");
    }
    section.push_str(&summary.markdown_tables());
    for f in files {
        let _ = writeln!(section, "![{f}](bench/{f})\n");
    }
    let _ = writeln!(section, "{end}");
    let page = dir.join("benchmarks.md");
    let old = std::fs::read_to_string(&page).unwrap_or_default();
    let new = match (old.find(begin), old.find(end)) {
        (Some(b), Some(e)) if b < e => format!(
            "{}{}{}",
            &old[..b],
            section.trim_end(),
            &old[e + end.len()..]
        ),
        _ if old.is_empty() => format!("# irqvm benchmarks\n\n{section}"),
        _ => format!("{old}\n{section}"),
    };
    std::fs::write(page, new)
}
