//! The suite's runs gathered into figures per workload and peer ([`Summary`]), with the checks
//! that every workload completed. Rendering them (tables, JSON, docs) is `report.rs`; the plots
//! are `plot.rs`; both read this model and nothing here depends on them.

use std::collections::BTreeMap;

use crate::runner::Peer;
use crate::stats;
use crate::suite::{Run, RunKind, Suite};

/// A table of the report: (title, header, rows).
pub type Table = (String, Vec<String>, Vec<Vec<String>>);

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
        "irq_level",
        "level-triggered line raised by the guest, lowered by its handler",
    ),
    (
        "timer_oneshot",
        "LAPIC one-shot timer: past its programmed expiry",
    ),
    ("timer_deadline", "TSC-deadline timer: past its deadline"),
    (
        "timer_sleep",
        "TSC-deadline timer 1 ms ahead, the vCPU asleep: past its deadline",
    ),
    (
        "timer_spin",
        "TSC-deadline timer 100 us ahead, the vCPU spinning: past its deadline",
    ),
    (
        "timer_deadline_expired",
        "TSC deadline already passed when written: WRMSR to handler",
    ),
    ("ipi_halted", "IPI round trip, both vCPUs halted"),
    ("ipi_spin", "IPI round trip, both vCPUs spinning"),
    (
        "ipi_halted_pveoi",
        "IPI round trip, both vCPUs halted, EOIs through KVM's PV EOI",
    ),
    (
        "apic_read",
        "one APIC register read: an exit to the APIC's emulator",
    ),
    (
        "apic_write",
        "one APIC register write (EOI): an exit to the APIC's emulator",
    ),
    (
        "port_read",
        "one port read: an exit to the VMM's userspace, every mode",
    ),
    (
        "irq_host",
        "device line raised by a host thread (irqvm only), host-observed",
    ),
    (
        "irq_host_msi",
        "MSI sent by a host thread (irqvm only), host-observed",
    ),
    (
        "ipi_storm_2",
        "many-to-one IPIs, 2 vCPUs: time per interrupt",
    ),
    (
        "ipi_storm_4",
        "many-to-one IPIs, 4 vCPUs: time per interrupt",
    ),
    (
        "ipi_storm_8",
        "many-to-one IPIs, 8 vCPUs: time per interrupt",
    ),
    (
        "ipi_storm_16",
        "many-to-one IPIs, 16 vCPUs: time per interrupt",
    ),
    (
        "ipi_broadcast_2",
        "broadcast IPI, 2 vCPUs: send to last taken",
    ),
    (
        "ipi_broadcast_4",
        "broadcast IPI, 4 vCPUs: send to last taken",
    ),
    (
        "ipi_broadcast_8",
        "broadcast IPI, 8 vCPUs: send to last taken",
    ),
    (
        "ipi_broadcast_16",
        "broadcast IPI, 16 vCPUs: send to last taken",
    ),
];

/// The architectural floor of each workload: the guest's accesses per delivered interrupt that
/// trap to the hypervisor in any mode without APIC virtualisation (xAPIC, as the guests run),
/// whether KVM handles them in the kernel or userspace does. (workload, exits, which).
pub const FLOORS: &[(&str, f64, &str)] = &[
    ("selfipi", 4.0, "ICR2, ICR writes, ICR busy read, EOI"),
    ("selfipi_tpr", 6.0, "TPR, ICR2, ICR, ICR read, TPR, EOI"),
    ("irq_guest", 3.0, "port write up, EOI, port write down"),
    ("irq_level", 3.0, "port write up, port write down, EOI"),
    ("timer_oneshot", 4.0, "LVT, TMICT writes, HLT, EOI"),
    ("timer_deadline", 4.0, "LVT, WRMSR deadline, HLT, EOI"),
    ("timer_sleep", 4.0, "LVT, WRMSR deadline, HLT, EOI"),
    ("timer_spin", 3.0, "LVT, WRMSR deadline, EOI"),
    ("timer_deadline_expired", 2.0, "WRMSR deadline, EOI"),
    ("ipi_halted", 5.0, "ICR2, ICR, ICR read, HLT, EOI"),
    ("ipi_spin", 4.0, "ICR2, ICR, ICR read, EOI"),
    ("ipi_halted_pveoi", 4.0, "ICR2, ICR, ICR read, HLT"),
    ("apic_read", 1.0, "the read, per access"),
    ("apic_write", 1.0, "the write, per access"),
    ("port_read", 1.0, "the read, per access"),
    ("irq_host", 2.0, "HLT, EOI"),
    ("ipi_storm_2", 5.0, "ICR2, ICR, ICR read, HLT, EOI"),
    (
        "ipi_storm_4",
        4.0,
        "ICR2, ICR, ICR read, EOI; CPU 0 rarely halts",
    ),
    (
        "ipi_storm_8",
        4.0,
        "ICR2, ICR, ICR read, EOI; CPU 0 rarely halts",
    ),
    (
        "ipi_storm_16",
        4.0,
        "ICR2, ICR, ICR read, EOI; CPU 0 rarely halts",
    ),
    (
        "ipi_broadcast_2",
        5.0,
        "per target: HLT, EOI; ICR2, ICR, ICR read / 1",
    ),
    (
        "ipi_broadcast_4",
        3.0,
        "per target: HLT, EOI; ICR2, ICR, ICR read / 3",
    ),
    (
        "ipi_broadcast_8",
        2.4,
        "per target: HLT, EOI; ICR2, ICR, ICR read / 7",
    ),
    (
        "ipi_broadcast_16",
        2.2,
        "per target: HLT, EOI; ICR2, ICR, ICR read / 15",
    ),
    ("irq_host_msi", 2.0, "HLT, EOI"),
];

/// The exit reasons the VMM counts (`COUNTERS:` keys) with their short names.
pub const EXIT_REASONS: &[(&str, &str)] = &[
    ("mmio_exits", "mmio"),
    ("pio_exits", "pio"),
    ("msr_exits", "msr"),
    ("hlt_exits", "hlt"),
    ("eintr_returns", "eintr"),
    ("other_exits", "other"),
];

/// The figures that count the port exits of the guest's end mark (each also a KVM_RUN ioctl
/// and a syscall), from the VMM's counters and from perf.
const MARK_EXIT_KEYS: &[&str] = &[
    "kvm_runs",
    "pio_exits",
    crate::perfstat::USERSPACE_EXITS,
    crate::perfstat::SYSCALLS,
    "syscalls:sys_enter_ioctl",
];

/// Exits to userspace the guest's `MARK: end <name>` line costs, in every mode and VMM: the
/// serial port is emulated in userspace, and the guest's polled output (`putc_raw`) takes two
/// port accesses per character (the LSR read, the THR write). The VMM's own write of the line
/// to its stdout is not taken out (one or a few syscalls per phase).
pub fn mark_exits(name: &str) -> u64 {
    2 * (format!("MARK: end {name}\n").len() as u64)
}

/// The host-driven workloads (`bench_irqhost`), with the label of their rows in the rates table.
pub const HOST_WORKLOADS: &[(&str, &str)] = &[("irq_host", "line"), ("irq_host_msi", "MSI")];

/// (host workload, hz) → (sent, delivered, elapsed ns, VMM CPU ns), summed over repeats.
pub type RateSteps = BTreeMap<(String, u64), (u64, u64, u64, u64)>;

/// One workload on one peer, over every repeat.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    /// Median latency (ns) of each run.
    pub run_medians: Vec<f64>,
    /// Every sample of every run (ns).
    pub pooled: Vec<f64>,
    pub exits_per_irq: Vec<f64>,
    pub cpu_ns_per_irq: Vec<f64>,
    /// Per delivered interrupt, one value per run: the VMM's counters (`COUNTERS:` keys, e.g.
    /// `mmio_exits`, `halt_sleeps`) and perf's events (`perfstat::EVENTS`).
    pub per_irq: BTreeMap<String, Vec<f64>>,
}

impl Cell {
    pub fn median(&self) -> Option<f64> {
        stats::median(&self.run_medians)
    }

    /// The median over the runs of a per-interrupt figure (`per_irq` key).
    pub fn per_irq(&self, key: &str) -> Option<f64> {
        stats::median(self.per_irq.get(key)?)
    }
}

/// The phases `bench_boot` splits each AP's start-up into (`guests/bench_boot.c`), in order:
/// (workload, what it covers).
pub const BOOT_PHASES: &[(&str, &str)] = &[
    ("boot_send", "the BSP's loop and INIT ICR write"),
    (
        "boot_wake",
        "INIT write's return → the AP's first instruction (SIPI write, INIT and SIPI taken)",
    ),
    (
        "boot_ap",
        "the AP's trampoline, C entry and local APIC set-up",
    ),
    ("boot_notice", "AP online → the BSP sees it"),
];

/// Boot runs of one peer at one vCPU count.
#[derive(Clone, Debug, Default)]
pub struct BootCell {
    pub boot_ns: Vec<f64>,
    pub rss_kib: Vec<f64>,
    pub cpu_ns: Vec<f64>,
    /// Phase (a [`BOOT_PHASES`] name) → ns per AP, every AP of every run.
    pub phases: BTreeMap<&'static str, Vec<f64>>,
}

/// Everything the suite's output is made of.
pub struct Summary<'a> {
    pub suite: &'a Suite,
    /// workload → peer → cell.
    pub cells: BTreeMap<&'static str, BTreeMap<Peer, Cell>>,
    /// vCPU count → peer → boot figures.
    pub boot: BTreeMap<u32, BTreeMap<Peer, BootCell>>,
    /// peer → (host workload, hz) → (sent, delivered, elapsed ns, CPU ns) summed over repeats.
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

    fn check_run(&mut self, run: &Run) {
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
                "irq_level",
                "timer_oneshot",
                "ipi_halted",
                "ipi_spin",
            ],
            RunKind::HostIrq => &["irq_host", "irq_host_msi"],
            RunKind::Ipi(n) => match n {
                2 => &["ipi_storm_2", "ipi_broadcast_2"],
                4 => &["ipi_storm_4", "ipi_broadcast_4"],
                8 => &["ipi_storm_8", "ipi_broadcast_8"],
                16 => &["ipi_storm_16", "ipi_broadcast_16"],
                _ => &[],
            },
            RunKind::Boot(_) => &["boot", "boot_send", "boot_wake", "boot_ap", "boot_notice"],
        };
        for name in expected {
            if !r.output.workloads.contains_key(*name) {
                self.problems
                    .push(format!("{what}: workload {name} missing"));
            }
        }
    }

    fn add_latencies(&mut self, run: &Run) {
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
            // A guest-marked phase ends with the guest printing its end mark, which the figures
            // include: take its port exits out (`mark_exits`).
            let marks = if w.host_ns.is_empty() {
                mark_exits(name)
            } else {
                0
            };
            let (exits, cpu) = match w.host_cost {
                Some((e, c)) => (Some(e), Some(c)),
                None => (
                    r.output.phase_exits(name).map(|e| e.saturating_sub(marks)),
                    r.phase_cpu_ns(name),
                ),
            };
            if let Some(e) = exits {
                cell.exits_per_irq.push(e as f64 / irqs);
            }
            if let Some(c) = cpu {
                cell.cpu_ns_per_irq.push(c as f64 / irqs);
            }
            let counted = r.output.phase_counters(name).into_iter().flatten();
            let perf = r.phase_perf(name).into_iter().flatten();
            for (k, v) in counted.chain(perf) {
                let v = if MARK_EXIT_KEYS.contains(&k.as_str()) {
                    v.saturating_sub(marks)
                } else {
                    v
                };
                cell.per_irq.entry(k).or_default().push(v as f64 / irqs);
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
            e.3 += p.cpu_ns;
        }
    }

    fn add_boot(&mut self, run: &Run, cpus: u32) {
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
        for (phase, _) in BOOT_PHASES {
            if let Some(w) = r.output.workloads.get(*phase) {
                let ns = w.cycles.iter().map(|&c| c as f64 * 1e9 / self.suite.tsc_hz);
                cell.phases.entry(phase).or_default().extend(ns);
            }
        }
    }

    /// What went wrong: runs that timed out, failed, lost a workload or miscounted.
    pub fn problems(&self) -> &[String] {
        &self.problems
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
    pub fn fastest(&self, workload: &str, peers: impl Iterator<Item = Peer>) -> Option<f64> {
        let cells = self.cells.get(workload)?;
        peers
            .filter_map(|p| cells.get(&p)?.median())
            .filter(|m| *m > 0.0)
            .min_by(f64::total_cmp)
    }
}
