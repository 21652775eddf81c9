//! The irqvm side of one benchmark run (`irqvm bench --vm-child KERNEL ...`, started by the
//! parent): boots the VM in this process with the serial port on stdout, and adds what only
//! the VMM can see:
//!
//! * `EXITS: begin|end <workload> <n>`: the vCPUs' userspace exits (KVM_RUN returns) when the
//!   guest printed the workload's `MARK:` line (a monitor thread watches the serial output; the
//!   guest pauses, halted, after each mark while the snapshot is taken);
//! * with `--child-host-driver` (guest `bench_irqhost`): a host thread pulses device line 11 through
//!   the VM's pc-testdev device model (the irqchip backend's `InterruptLines`) and reads the
//!   guest's counter from guest memory: `HOSTRATE:` lines for fixed rates (open loop: pulses that
//!   merge in the IOAPIC/IRR before the guest took the previous one are lost), and a closed loop
//!   (next pulse once the previous one was counted) for latency (`HOSTSAMPLES:`, line raised →
//!   count visible to the host, ns) and costs (`HOSTLAT:`, CPU time without the driver thread).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use crate::devices::{Devices, SerialCapture, SerialOutput, TESTDEV_IRQ_PORT};
use crate::irqchip::IrqchipMode;
use crate::memory::GuestRam;
use crate::vcpu::VcpuState;
use crate::vm::{RunningVm, Vm, VmConfig};

/// Line the host pulses (guest: IOAPIC pin 11 → counting handler); line 12 only wakes the guest.
const HOST_LINE: u16 = 11;
const WAKE_LINE: u16 = 12;
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// What the parent asks of the child.
pub struct ChildSpec {
    pub kernel: std::path::PathBuf,
    pub cpus: u32,
    pub irqchip: IrqchipMode,
    pub cmdline: String,
    pub host_driver: bool,
    /// Host-driven pulses per step, and the open-loop rates.
    pub pulses: u32,
    pub rates: Vec<u64>,
}

/// Runs the child; returns the process exit status.
pub fn main(spec: ChildSpec) -> Result<i32, String> {
    let kernel = std::fs::read(&spec.kernel)
        .map_err(|e| format!("cannot read {}: {e}", spec.kernel.display()))?;
    let mut cfg = VmConfig::new(kernel, &spec.kernel.display().to_string());
    cfg.cpus = spec.cpus;
    cfg.irqchip = spec.irqchip;
    cfg.cmdline = spec.cmdline.clone();
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::StdoutAndCapture(capture.clone());
    let vm = Vm::new(&cfg).map_err(|e| e.to_string())?;
    let memory = vm.memory().clone();
    let vm = Arc::new(vm.start().map_err(|e| e.to_string())?);
    let finished = Arc::new(AtomicBool::new(false));
    let helper = if spec.host_driver {
        let (vm, capture, finished) = (vm.clone(), capture.clone(), finished.clone());
        std::thread::spawn(move || drive(&vm, &memory, &capture, &finished, &spec))
    } else {
        let (vm, capture, finished) = (vm.clone(), capture.clone(), finished.clone());
        std::thread::spawn(move || monitor_marks(&vm, &capture, &finished))
    };
    let result = wait_shared(vm, &finished, CHILD_TIMEOUT);
    let lines = helper.join().unwrap_or_default();
    for line in lines {
        println!("{line}");
    }
    match result {
        Ok(report) => Ok(report.exit.exit_status()),
        Err(e) => Err(e.to_string()),
    }
}

/// Waits for a VM the helper thread also holds: once a vCPU has stopped (the VM is ending) (or the timeout
/// passed, then the VM is stopped), `finished` tells the helper to return its `Arc`, and the VM
/// is waited for as usual.
fn wait_shared(
    mut vm: Arc<RunningVm>,
    finished: &AtomicBool,
    timeout: Duration,
) -> Result<crate::vm::RunReport, crate::vm::VmError> {
    let deadline = Instant::now() + timeout;
    loop {
        match Arc::try_unwrap(vm) {
            // `wait`'s timeout counts from the VM's start, like `deadline`.
            Ok(owned) => return owned.wait(Some(timeout + Duration::from_secs(5))),
            Err(shared) => vm = shared,
        }
        let stopped = (0..vm.vcpu_count()).any(|i| vm.vcpu(i).state() == VcpuState::Stopped);
        if Instant::now() >= deadline {
            vm.stop();
            finished.store(true, Ordering::SeqCst);
        }
        if stopped {
            finished.store(true, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn exits_so_far(vm: &RunningVm) -> u64 {
    (0..vm.vcpu_count())
        .map(|i| vm.vcpu(i).stats.kvm_runs.load(Ordering::Relaxed))
        .sum()
}

/// Watches the serial output for `MARK:` lines and snapshots the exit counters at each. Returns
/// the `EXITS:` lines. Ends when the guest prints DONE or the VM finished.
fn monitor_marks(vm: &RunningVm, capture: &SerialCapture, finished: &AtomicBool) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen = 0;
    loop {
        let text = capture.text();
        let complete = text.rfind('\n').map_or(0, |i| i + 1);
        for line in text.get(seen..complete).unwrap_or("").lines() {
            if let Some((edge, name)) = super::parse::mark(line) {
                out.push(format!("EXITS: {edge} {name} {}", exits_so_far(vm)));
            }
        }
        seen = seen.max(complete);
        if text.contains("DONE: ") || finished.load(Ordering::SeqCst) {
            return out;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// On-CPU ns of the calling thread.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Addresses from the guest's `READY: count=0x... stop=0x...` line.
fn wait_ready(capture: &SerialCapture, finished: &AtomicBool) -> Option<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !finished.load(Ordering::SeqCst) {
        let text = capture.text();
        // Only complete lines: the serial port delivers the line one byte at a time.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(line) = complete.lines().find(|l| l.starts_with("READY: ")) {
            let addr = |key: &str| {
                let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
                u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
            };
            return Some((addr("count=")?, addr("stop=")?));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn pulse(devices: &Devices, line: u16) {
    devices.pio_write(TESTDEV_IRQ_PORT + line, &[1]);
    devices.pio_write(TESTDEV_IRQ_PORT + line, &[0]);
}

/// The host-driven device interrupt workload. Returns the lines to print.
fn drive(
    vm: &RunningVm,
    memory: &GuestRam,
    capture: &SerialCapture,
    finished: &AtomicBool,
    spec: &ChildSpec,
) -> Vec<String> {
    let mut out = Vec::new();
    let Some((count_addr, stop_addr)) = wait_ready(capture, finished) else {
        out.push("FAIL: irq_host: the guest never printed READY".into());
        return out;
    };
    let count = || -> u64 {
        memory
            .load::<u32>(GuestAddress(count_addr), Ordering::Acquire)
            .map_or(0, u64::from)
    };
    let devices = vm.devices().clone();
    // The guest is still printing the READY line (interrupts off in printf): let it reach its
    // halt loop, or the first two pulses merge.
    std::thread::sleep(Duration::from_millis(20));
    let mut sent_total = 0u64;
    for &hz in &spec.rates {
        let c0 = count();
        let start = Instant::now();
        let period = Duration::from_secs_f64(1.0 / hz as f64);
        for i in 0..spec.pulses {
            let due = start + period * i;
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                if due - now > Duration::from_micros(300) {
                    std::thread::sleep(due - now - Duration::from_micros(200));
                } else {
                    std::thread::yield_now();
                }
            }
            pulse(&devices, HOST_LINE);
        }
        let elapsed = start.elapsed();
        sent_total += u64::from(spec.pulses);
        let delivered = settle(&count, c0, u64::from(spec.pulses));
        out.push(format!(
            "HOSTRATE: hz={hz} sent={} delivered={delivered} elapsed_ns={}",
            spec.pulses,
            elapsed.as_nanos()
        ));
    }
    // Closed loop: each pulse waits for the previous one to be counted.
    let (c0, exits0, cpu0, drv0) = (count(), exits_so_far(vm), own_cpu_ns(), thread_cpu_ns());
    let mut samples = Vec::new();
    for _ in 0..spec.pulses {
        let before = count();
        let t0 = Instant::now();
        pulse(&devices, HOST_LINE);
        while count() == before
            && t0.elapsed() < Duration::from_secs(1)
            && !finished.load(Ordering::SeqCst)
        {
            std::hint::spin_loop();
        }
        samples.push(t0.elapsed().as_nanos().to_string());
    }
    let (c1, exits1, cpu1, drv1) = (count(), exits_so_far(vm), own_cpu_ns(), thread_cpu_ns());
    sent_total += u64::from(spec.pulses);
    let cpu = (cpu1 - cpu0).saturating_sub(drv1 - drv0);
    out.push(format!(
        "HOSTLAT: name=irq_host sent={} counted={} exits={} cpu_ns={cpu}",
        spec.pulses,
        c1 - c0,
        exits1 - exits0
    ));
    for chunk in samples.chunks(16) {
        out.push(format!("HOSTSAMPLES: name=irq_host {}", chunk.join(" ")));
    }
    out.push(format!("HOSTSENT: irq_host={sent_total}"));
    let _ = memory.store(1u32, GuestAddress(stop_addr), Ordering::Release);
    pulse(&devices, WAKE_LINE);
    out
}

/// Waits until the counter reaches `c0 + sent` or stops moving for 100 ms; returns the increase.
fn settle(count: &impl Fn() -> u64, c0: u64, sent: u64) -> u64 {
    let mut last = count();
    let mut last_change = Instant::now();
    while last - c0 < sent && last_change.elapsed() < Duration::from_millis(100) {
        std::thread::sleep(Duration::from_micros(200));
        let now = count();
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    last.saturating_sub(c0)
}

fn own_cpu_ns() -> u64 {
    super::runner::process_cpu_ns(std::process::id())
}
