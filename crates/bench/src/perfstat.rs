//! Syscalls and KVM events of a child VM per workload, from `perf stat` (Linux tracepoints):
//! the same measurement for every peer, QEMU included, with nothing added to the VMM.
//!
//! `perf stat -I 10 -x, -p PID` is attached to the child once it printed its first line (its
//! threads exist by then: irqvm starts its vCPU threads, QEMU its vCPU and I/O
//! threads, before the guest runs) and prints per-interval counts on a pipe that a thread reads
//! as they come. A workload's figures are the sum of the intervals that end within its
//! `MARK: begin` / `MARK: end` window shifted by half the guest's quiet pause: the guest pauses
//! 30 ms after each mark, so with 10 ms intervals the first interval counted starts inside the
//! pause after `begin` and the last one ends inside the pause after `end`.
//!
//! The events: `raw_syscalls:sys_enter` (every syscall of the process) and, by name, the
//! ioctls (KVM_RUN, KVM_INTERRUPT, KVM_IRQ_LINE, ...), futexes (wake-ups, sleeps), `tgkill`
//! (kicks) and `timer_settime` (timers armed), `kvm:kvm_userspace_exit` (KVM_RUN returns to userspace), `kvm:kvm_apic`
//! (APIC register accesses KVM's in-kernel LAPIC emulates: the exits `kernel` and `split`
//! handle without userspace), `kvm:kvm_inj_virq` (interrupts KVM injected). Where perf or a
//! tracepoint is unavailable the figures are absent (n/a), never guessed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The events counted, in the order given to perf.
pub const EVENTS: &[&str] = &[
    SYSCALLS,
    "syscalls:sys_enter_ioctl",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_tgkill",
    "syscalls:sys_enter_timer_settime",
    "kvm:kvm_userspace_exit",
    "kvm:kvm_apic",
    "kvm:kvm_inj_virq",
];

/// Every syscall.
pub const SYSCALLS: &str = "raw_syscalls:sys_enter";
/// The syscalls shown by name, with their short names (the rest is `other`).
pub const SYSCALL_KINDS: &[(&str, &str)] = &[
    ("syscalls:sys_enter_ioctl", "ioctl"),
    ("syscalls:sys_enter_futex", "futex"),
    ("syscalls:sys_enter_tgkill", "tgkill"),
    ("syscalls:sys_enter_timer_settime", "timer_settime"),
];
/// KVM_RUN returns to userspace.
pub const USERSPACE_EXITS: &str = "kvm:kvm_userspace_exit";
/// APIC register accesses emulated by KVM's in-kernel LAPIC.
pub const KERNEL_APIC_ACCESSES: &str = "kvm:kvm_apic";

/// perf's interval (its minimum).
const INTERVAL: Duration = Duration::from_millis(10);
/// Half of the guest's quiet pause after each mark (`bench.h`, PAUSE_MS = 30).
const MARGIN: Duration = Duration::from_millis(15);

/// One interval line: when it ended (host time) and the counts of each event in it.
#[derive(Clone, Debug)]
struct Interval {
    end: Instant,
    counts: BTreeMap<String, u64>,
}

/// One line read from perf: when it arrived, perf's interval time (s), the event, its count.
type Line = (Instant, f64, String, Option<u64>);

/// A running `perf stat` on one child.
pub struct PerfStat {
    child: Child,
    reader: Option<std::thread::JoinHandle<()>>,
    lines: Arc<Mutex<Vec<Line>>>,
}

/// The per-interval counts of one finished child run.
#[derive(Clone, Debug, Default)]
pub struct PerfTrace {
    intervals: Vec<Interval>,
}

/// The path of perf, if installed.
fn find_perf() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("perf"))
        .find(|p| p.is_file())
}

/// One CSV line of `perf stat -I -x,`: `time,count,unit,event,...`. `None` for other lines;
/// a count perf did not take is `Some(None)`: `<not counted>` (perf prints it for an interval
/// in which no thread of the process ran, which counts as zero) or `<not supported>`.
fn parse_line(line: &str) -> Option<(f64, String, Option<u64>)> {
    let mut fields = line.trim().split(',');
    let time: f64 = fields.next()?.trim().parse().ok()?;
    let count = fields.next()?.trim().parse::<u64>().ok();
    let _unit = fields.next()?;
    let event = fields.next()?.trim().to_string();
    event.contains(':').then_some((time, event, count))
}

impl PerfStat {
    /// Attaches to `pid`; `None` if perf is not installed or does not start.
    pub fn attach(pid: u32) -> Option<Self> {
        let perf = find_perf()?;
        let mut child = Command::new(perf)
            .args(["stat", "-I", &INTERVAL.as_millis().to_string(), "-x,"])
            .args(["-e", &EVENTS.join(",")])
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        let stderr = child.stderr.take()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if let Some((t, event, count)) = parse_line(&line) {
                        let mut l = lines.lock().unwrap_or_else(|p| p.into_inner());
                        l.push((Instant::now(), t, event, count));
                    }
                }
            })
        };
        Some(Self {
            child,
            reader: Some(reader),
            lines,
        })
    }

    /// Stops perf (SIGINT: it prints its last interval) and returns the intervals. Perf's
    /// interval times count from its own start; the host time of each is estimated as the
    /// earliest arrival minus the stated time over all lines (a line never arrives before its
    /// interval ended, and the quickest one arrived right after).
    pub fn finish(mut self) -> PerfTrace {
        // SAFETY: plain syscall on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(|p| p.into_inner()));
        PerfTrace::from_lines(&lines)
    }
}

impl PerfTrace {
    fn from_lines(lines: &[Line]) -> Self {
        let Some(origin) = lines
            .iter()
            .filter_map(|(at, t, _, _)| at.checked_sub(Duration::from_secs_f64(*t)))
            .min()
        else {
            return Self::default();
        };
        let mut by_time: BTreeMap<u64, Interval> = BTreeMap::new();
        for (_, t, event, count) in lines {
            let key = (t * 1e9) as u64;
            let iv = by_time.entry(key).or_insert_with(|| Interval {
                end: origin + Duration::from_secs_f64(*t),
                counts: BTreeMap::new(),
            });
            // No thread ran in the interval (`<not counted>`): nothing happened.
            iv.counts.insert(event.clone(), count.unwrap_or(0));
        }
        Self {
            intervals: by_time.into_values().collect(),
        }
    }

    /// Counts per event between the marks at `begin` and `end` (see the module documentation);
    /// `None` if perf did not cover the window (it started late or counted nothing) or an
    /// event was never counted.
    pub fn phase(&self, begin: Instant, end: Instant) -> Option<BTreeMap<String, u64>> {
        let first = self.intervals.first()?;
        // Perf must have been counting before the window opened.
        if first.end.checked_sub(INTERVAL)? > begin + MARGIN {
            return None;
        }
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        let mut seen = 0;
        for iv in &self.intervals {
            if iv.end > begin + MARGIN && iv.end <= end + MARGIN {
                seen += 1;
                for (e, c) in &iv.counts {
                    *sums.entry(e.clone()).or_default() += c;
                }
            }
        }
        let last = self.intervals.last()?;
        let complete = last.end >= end + MARGIN && seen > 0;
        (complete && EVENTS.iter().all(|e| sums.contains_key(*e))).then_some(sums)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_interval_lines_parse_and_others_do_not() {
        assert_eq!(
            parse_line("     0.010072413,12,,raw_syscalls:sys_enter,10044931,100.00,,"),
            Some((0.010072413, "raw_syscalls:sys_enter".into(), Some(12)))
        );
        assert_eq!(
            parse_line("0.02,<not counted>,,kvm:kvm_apic,0,100.00,,"),
            Some((0.02, "kvm:kvm_apic".into(), None))
        );
        assert_eq!(parse_line("#           time counts unit events"), None);
        assert_eq!(parse_line(""), None);
    }

    /// Intervals ending inside the shifted window are summed; a window perf did not cover
    /// (it ends after perf's last interval) gives nothing.
    #[test]
    fn a_phase_sums_the_intervals_of_its_window() {
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for i in 1..=20u32 {
            let t = f64::from(i) * 0.01;
            let at = t0 + Duration::from_secs_f64(t);
            for e in EVENTS {
                lines.push((at, t, e.to_string(), Some(u64::from(i))));
            }
        }
        let trace = PerfTrace::from_lines(&lines);
        // begin at 40 ms, end at 100 ms: intervals ending in (55, 115] ms: 60, 70, ..., 110.
        let sums = trace
            .phase(
                t0 + Duration::from_millis(40),
                t0 + Duration::from_millis(100),
            )
            .unwrap();
        assert_eq!(sums["kvm:kvm_apic"], 6 + 7 + 8 + 9 + 10 + 11);
        assert!(trace
            .phase(
                t0 + Duration::from_millis(150),
                t0 + Duration::from_millis(300)
            )
            .is_none());
    }
}
