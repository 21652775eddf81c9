//! Parsing what a benchmark run printed: the guest's lines (`crates/irqvm/guests/bench.h`) and the
//! lines the irqvm child adds (`EXITS:`, `HOST...:`, see `child.rs`).

use std::collections::BTreeMap;

/// One workload's figures as its run reported them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workload {
    pub sent: u64,
    pub counted: u64,
    /// Interrupts the phase delivered in all (a round trip counts two).
    pub interrupts: u64,
    /// Subtracted from every sample after conversion to ns.
    pub offset_ns: f64,
    /// Guest samples in TSC cycles.
    pub cycles: Vec<u64>,
    /// Host-measured samples in ns (host-driven workloads).
    pub host_ns: Vec<f64>,
    /// Exits and host CPU ns over the phase, when the child measured them itself.
    pub host_cost: Option<(u64, u64)>,
}

/// One host-driven rate step: interrupts of workload `name` (`irq_host` line pulses,
/// `irq_host_msi` MSIs) sent at `hz`, interrupts the guest counted.
#[derive(Clone, Debug, PartialEq)]
pub struct RatePoint {
    pub name: String,
    pub hz: u64,
    pub sent: u64,
    pub delivered: u64,
    pub elapsed_ns: u64,
    /// Host CPU ns of the VMM (without the driver thread) over the step.
    pub cpu_ns: u64,
}

/// Everything parsed from one run's output.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunOutput {
    pub workloads: BTreeMap<String, Workload>,
    /// `(begin|end, workload)` → userspace exits so far (irqvm only).
    pub exits: BTreeMap<(String, String), u64>,
    /// `(begin|end, workload)` → the VMM's counters by name (irqvm only, `COUNTERS:`).
    pub counters: BTreeMap<(String, String), BTreeMap<String, u64>>,
    pub rates: Vec<RatePoint>,
    pub failures: Vec<String>,
    pub done: bool,
    /// The guest's own total of host-driven interrupts (`COUNT: irq_host=`).
    pub host_count: Option<u64>,
    /// What the host thread sent in all (`HOSTSENT: irq_host=`).
    pub host_sent: Option<u64>,
}

/// `key=value` pairs of a line, in order.
fn pairs(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split_whitespace().filter_map(|w| w.split_once('='))
}

fn field(text: &str, key: &str) -> Option<u64> {
    pairs(text).find(|(k, _)| *k == key)?.1.parse().ok()
}

fn name_of(text: &str) -> Option<String> {
    pairs(text)
        .find(|(k, _)| *k == "name")
        .map(|(_, v)| v.to_string())
}

/// Values after the `name=` word.
fn values(text: &str) -> impl Iterator<Item = &str> {
    text.split_whitespace().filter(|w| !w.starts_with("name="))
}

impl RunOutput {
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            out.parse_line(line.trim_end_matches('\r'));
        }
        out
    }

    fn workload(&mut self, rest: &str) -> Option<&mut Workload> {
        let name = name_of(rest)?;
        Some(self.workloads.entry(name).or_default())
    }

    fn parse_line(&mut self, line: &str) {
        let Some((tag, rest)) = line.split_once(": ") else {
            return;
        };
        match tag {
            "BENCH" => {
                if let Some(w) = self.workload(rest) {
                    w.sent = field(rest, "sent").unwrap_or(0);
                    w.counted = field(rest, "counted").unwrap_or(0);
                    w.interrupts = field(rest, "interrupts").unwrap_or(0);
                    w.offset_ns = field(rest, "offset_ns").unwrap_or(0) as f64;
                }
            }
            "SAMPLES" => {
                if let Some(w) = self.workload(rest) {
                    let parsed = values(rest).filter_map(|v| u64::from_str_radix(v, 16).ok());
                    w.cycles.extend(parsed);
                }
            }
            "HOSTSAMPLES" => {
                if let Some(w) = self.workload(rest) {
                    w.host_ns
                        .extend(values(rest).filter_map(|v| v.parse::<f64>().ok()));
                }
            }
            "HOSTLAT" => {
                if let Some(w) = self.workload(rest) {
                    w.sent = field(rest, "sent").unwrap_or(0);
                    w.counted = field(rest, "counted").unwrap_or(0);
                    w.interrupts = w.counted;
                    if let (Some(e), Some(c)) = (field(rest, "exits"), field(rest, "cpu_ns")) {
                        w.host_cost = Some((e, c));
                    }
                }
            }
            "HOSTRATE" => {
                let get = |k| field(rest, k).unwrap_or(0);
                self.rates.push(RatePoint {
                    name: name_of(rest).unwrap_or_else(|| "irq_host".into()),
                    hz: get("hz"),
                    sent: get("sent"),
                    delivered: get("delivered"),
                    elapsed_ns: get("elapsed_ns"),
                    cpu_ns: get("cpu_ns"),
                });
            }
            "EXITS" => {
                let mut words = rest.split_whitespace();
                if let (Some(edge), Some(name), Some(Ok(n))) =
                    (words.next(), words.next(), words.next().map(str::parse))
                {
                    self.exits.insert((edge.to_string(), name.to_string()), n);
                }
            }
            "COUNTERS" => {
                let mut words = rest.split_whitespace();
                if let (Some(edge), Some(name)) = (words.next(), words.next()) {
                    let values = words
                        .filter_map(|w| w.split_once('='))
                        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                        .collect();
                    self.counters
                        .insert((edge.to_string(), name.to_string()), values);
                }
            }
            "COUNT" => self.host_count = field(rest, "irq_host"),
            "HOSTSENT" => self.host_sent = field(rest, "irq_host"),
            "FAIL" => self.failures.push(rest.to_string()),
            "DONE" => self.done = true,
            _ => {}
        }
    }

    /// Userspace exits between the `begin` and `end` marks of `name`.
    pub fn phase_exits(&self, name: &str) -> Option<u64> {
        let get = |edge: &str| {
            self.exits
                .get(&(edge.to_string(), name.to_string()))
                .copied()
        };
        Some(get("end")?.saturating_sub(get("begin")?))
    }
}

impl RunOutput {
    /// The VMM's counters' increase between the `begin` and `end` marks of `name`.
    pub fn phase_counters(&self, name: &str) -> Option<BTreeMap<String, u64>> {
        let get = |edge: &str| self.counters.get(&(edge.to_string(), name.to_string()));
        let (begin, end) = (get("begin")?, get("end")?);
        Some(
            end.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.saturating_sub(begin.get(k).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        )
    }
}

/// The workload a `MARK:` line opens or closes: `("begin", name)`.
pub fn mark(line: &str) -> Option<(&str, &str)> {
    let rest = line.strip_prefix("MARK: ")?;
    let (edge, name) = rest.trim().split_once(' ')?;
    matches!(edge, "begin" | "end").then_some((edge, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "PASS: all cpus online\n\
        MARK: begin selfipi\n\
        EXITS: begin selfipi 100\n\
        MARK: end selfipi\n\
        BENCH: name=selfipi sent=3 counted=3 interrupts=3 offset_ns=50\n\
        SAMPLES: name=selfipi 10 ff\n\
        SAMPLES: name=selfipi 1a\n\
        EXITS: end selfipi 160\n\
        COUNTERS: begin selfipi kvm_runs=100 mmio_exits=40\n\
        COUNTERS: end selfipi kvm_runs=160 mmio_exits=70 hlt_exits=3\n\
        HOSTRATE: hz=1000 sent=10 delivered=9 elapsed_ns=9000000\n\
        HOSTRATE: name=irq_host_msi hz=1000 sent=10 delivered=10 elapsed_ns=9000000\n\
        HOSTLAT: name=irq_host sent=5 counted=5 exits=20 cpu_ns=1000\n\
        HOSTSAMPLES: name=irq_host 1500 2500.5\n\
        COUNT: irq_host=15\n\
        FAIL: x: y\n\
        DONE: 1 passed, 1 failed\n";

    #[test]
    fn guest_lines_become_workloads() {
        let out = RunOutput::parse(SAMPLE);
        let w = &out.workloads["selfipi"];
        assert_eq!((w.sent, w.counted, w.interrupts), (3, 3, 3));
        assert_eq!(w.offset_ns, 50.0);
        assert_eq!(w.cycles, vec![0x10, 0xff, 0x1a]);
        assert_eq!(out.phase_exits("selfipi"), Some(60));
        let c = out.phase_counters("selfipi").unwrap();
        assert_eq!(
            (c["kvm_runs"], c["mmio_exits"], c["hlt_exits"]),
            (60, 30, 3)
        );
        assert!(out.done);
        assert_eq!(out.failures, vec!["x: y".to_string()]);
    }

    #[test]
    fn host_lines_become_rates_and_costs() {
        let out = RunOutput::parse(SAMPLE);
        assert_eq!(out.rates[0].delivered, 9);
        assert_eq!(out.rates[0].name, "irq_host", "no name: the line workload");
        assert_eq!(
            (out.rates[1].name.as_str(), out.rates[1].delivered),
            ("irq_host_msi", 10)
        );
        let w = &out.workloads["irq_host"];
        assert_eq!(w.host_cost, Some((20, 1000)));
        assert_eq!(w.host_ns, vec![1500.0, 2500.5]);
        assert_eq!(out.host_count, Some(15));
    }

    #[test]
    fn garbage_is_ignored() {
        let out = RunOutput::parse("BENCH: sent=x\nSAMPLES: name=a zz 1\nEXITS: begin\nMARK:\n");
        assert_eq!(out.workloads["a"].cycles, vec![1]);
        assert!(out.exits.is_empty());
        assert_eq!(mark("MARK: begin a"), Some(("begin", "a")));
        assert_eq!(mark("MARK: middle a"), None);
    }
}
