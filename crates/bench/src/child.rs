//! The irqvm side of one benchmark run (`irqvm-bench --vm-child KERNEL ...`, started by the
//! parent): boots the VM in this process with the serial port on stdout, and adds what only
//! the VMM can see:
//!
//! * `EXITS: begin|end <workload> <n>`: the vCPUs' userspace exits (KVM_RUN returns) when the
//!   guest printed the workload's `MARK:` line (a monitor thread watches the serial output; the
//!   guest pauses, halted, after each mark while the snapshot is taken);
//! * `COUNTERS: begin|end <workload> key=value ...`: at the same moments, the exits by reason
//!   and the irqchip backend's counters, summed over the vCPUs (`counters_so_far`);
//! * with `--child-host-driver` (guest `bench_irqhost`): a host thread pulses device line 11 through
//!   the VM's pc-testdev device model (the irqchip backend's `InterruptLines`) and reads the
//!   guest's counter from guest memory: `HOSTRATE:` lines for fixed rates (open loop: pulses that
//!   merge in the IOAPIC/IRR before the guest took the previous one are lost; with the VMM's CPU
//!   time over the step, without the driver thread), and a closed loop
//!   (next pulse once the previous one was counted) for latency (`HOSTSAMPLES:`, line raised →
//!   count visible to the host, ns) and costs (`HOSTLAT:`, CPU time without the driver thread);
//!   then the same again with MSIs (`RunningVm::signal_msi`, fixed, physical, edge) of the same
//!   vector to CPU 0 (workload `irq_host_msi`). The closed loops are marked (`MARK:` lines
//!   printed by the child itself, with the guests' quiet pause after each) like guest workloads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use irqvm::devices::{Devices, SerialCapture, SerialOutput, TESTDEV_IRQ_PORT};
use irqvm::memory::GuestRam;
use irqvm::vcpu::VcpuState;
use irqvm::vm::{RunReport, RunningVm, Vm, VmConfig, VmError};
use irqvm::IrqchipMode;
use vm_memory::{Bytes, GuestAddress};

/// Line the host pulses (guest: IOAPIC pin 11 → counting handler); line 12 only wakes the guest.
const HOST_LINE: u16 = 11;
const WAKE_LINE: u16 = 12;

/// What the parent asks of the child.
pub struct ChildSpec {
    pub kernel: std::path::PathBuf,
    pub cpus: u32,
    /// How long the VM may run before it is stopped.
    pub timeout: Duration,
    pub irqchip: IrqchipMode,
    pub cmdline: String,
    pub host_driver: bool,
    /// `VmConfig::exact_irq_boundaries` (off only in A/B runs).
    pub exact_irq_boundaries: bool,
    /// Host-driven pulses per step, and the open-loop rates.
    pub pulses: u32,
    pub rates: Vec<u64>,
}

/// Runs the child; returns the process exit status.
pub fn main(spec: ChildSpec) -> Result<i32, String> {
    let timeout = spec.timeout;
    let kernel = std::fs::read(&spec.kernel)
        .map_err(|e| format!("cannot read {}: {e}", spec.kernel.display()))?;
    let mut cfg = VmConfig::new(kernel, &spec.kernel.display().to_string());
    cfg.cpus = spec.cpus;
    cfg.irqchip = spec.irqchip;
    cfg.cmdline = spec.cmdline.clone();
    cfg.exact_irq_boundaries = spec.exact_irq_boundaries;
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::StdoutAndCapture(capture.clone());
    let vm = Vm::new(&cfg).map_err(|e| e.to_string())?;
    // IRQVM_BENCH_TRACE=1: the flight recorder on for the whole run, to measure its cost
    // (docs/benchmarks.md, "Flight recorder overhead"); what it records is dropped.
    if std::env::var_os("IRQVM_BENCH_TRACE").is_some() {
        vm.tracer().start().map_err(|e| e.to_string())?;
    }
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
    let result = wait_shared(vm, &finished, timeout);
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
) -> Result<RunReport, VmError> {
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

/// The VMM's counters summed over the vCPUs, by name: userspace exits by reason (the vCPU
/// statistics) and what the irqchip backend counts (`vm.counters` of the control API: in
/// `user` mode KVM_INTERRUPT injections, halts that polled or slept, posts that kicked or
/// woke). Per-vector injection counts are left out (their total is `interrupts_injected`).
fn counters_so_far(vm: &RunningVm) -> std::collections::BTreeMap<String, u64> {
    let mut all = std::collections::BTreeMap::new();
    let mut add = |name: &str, v: u64| *all.entry(name.to_string()).or_insert(0) += v;
    for i in 0..vm.vcpu_count() {
        let s = vm.vcpu(i).stats.snapshot();
        add("kvm_runs", s.kvm_runs);
        add("eintr_returns", s.eintr_returns);
        add("pio_exits", s.pio_exits);
        add("mmio_exits", s.mmio_exits);
        add("msr_exits", s.msr_exits);
        add("hlt_exits", s.hlt_exits);
        add("other_exits", s.other_exits);
        add("blocks", s.blocks);
    }
    vm.irqchip().counters(&mut |_, name, v| {
        if !name.starts_with("injected_vector_") {
            add(name, v);
        }
    });
    all
}

/// The `COUNTERS:` line of a mark.
fn counters_line(vm: &RunningVm, edge: &str, name: &str) -> String {
    let words: Vec<String> = counters_so_far(vm)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("COUNTERS: {edge} {name} {}", words.join(" "))
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
            if let Some((edge, name)) = crate::parse::mark(line) {
                out.push(format!("EXITS: {edge} {name} {}", exits_so_far(vm)));
                out.push(counters_line(vm, edge, name));
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

/// What the guest's `READY: count=0x... stop=0x... apic=N` line says: the counter's and the stop
/// flag's addresses, and CPU 0's APIC ID (0 if the line has none).
struct Ready {
    count: u64,
    stop: u64,
    apic_id: u32,
}

fn wait_ready(capture: &SerialCapture, finished: &AtomicBool) -> Option<Ready> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline && !finished.load(Ordering::SeqCst) {
        let text = capture.text();
        // Only complete lines: the serial port delivers the line one byte at a time.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(line) = complete.lines().find(|l| l.starts_with("READY: ")) {
            let value = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key));
            let addr =
                |key: &str| u64::from_str_radix(value(key)?.trim_start_matches("0x"), 16).ok();
            return Some(Ready {
                count: addr("count=")?,
                stop: addr("stop=")?,
                apic_id: value("apic=").and_then(|v| v.parse().ok()).unwrap_or(0),
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn pulse(devices: &Devices, line: u16) {
    devices.pio_write(TESTDEV_IRQ_PORT + line, &[1]);
    devices.pio_write(TESTDEV_IRQ_PORT + line, &[0]);
}

/// The fixed, physical, edge MSI for vector `vector` on APIC ID `apic_id` (SDM vol. 3 §11.11:
/// destination ID in address bits 19:12, vector in data bits 7:0, delivery mode 0 = fixed).
fn msi_to(apic_id: u32, vector: u32) -> (u64, u32) {
    (0xFEE0_0000 | u64::from(apic_id & 0xFF) << 12, vector)
}

/// The guest's vector for the host's interrupts (`bench_irqhost.c`, V_HOST; IOAPIC pin 11 sends it too).
const HOST_VECTOR: u32 = 0x70;

/// The host-driven device interrupt workloads: `irq_host` pulses line 11 through the
/// pc-testdev model (IOAPIC pin 11 → V_HOST on CPU 0), `irq_host_msi` sends the same vector to
/// CPU 0 as an MSI (`RunningVm::signal_msi`). Each gets its open-loop rates and its closed loop.
/// Returns the lines to print.
fn drive(
    vm: &RunningVm,
    memory: &GuestRam,
    capture: &SerialCapture,
    finished: &AtomicBool,
    spec: &ChildSpec,
) -> Vec<String> {
    let mut out = Vec::new();
    let Some(ready) = wait_ready(capture, finished) else {
        out.push("FAIL: irq_host: the guest never printed READY".into());
        return out;
    };
    let count = || -> u64 {
        memory
            .load::<u32>(GuestAddress(ready.count), Ordering::Acquire)
            .map_or(0, u64::from)
    };
    let devices = vm.devices().clone();
    // The guest is still printing the READY line (interrupts off in printf): let it reach its
    // halt loop, or the first two pulses merge. The parent also attaches its syscall counter
    // (perf, `perfstat.rs`) at the first line: give it the time the latency guest gives it.
    std::thread::sleep(Duration::from_millis(500));
    let line = || pulse(&devices, HOST_LINE);
    let (address, data) = msi_to(ready.apic_id, HOST_VECTOR);
    let msi_failed = AtomicBool::new(false);
    let msi = || {
        if let Err(e) = vm.signal_msi(address, data) {
            if !msi_failed.swap(true, Ordering::Relaxed) {
                eprintln!("irq_host_msi: {e}");
            }
        }
    };
    let mut sent_total = 0u64;
    let sources: [(&str, &dyn Fn()); 2] = [("irq_host", &line), ("irq_host_msi", &msi)];
    for (name, send) in sources {
        sent_total += drive_one(vm, &count, finished, spec, name, send, &mut out);
    }
    if msi_failed.load(Ordering::Relaxed) {
        out.push("FAIL: irq_host_msi: signal_msi refused a well-formed MSI".into());
    }
    out.push(format!("HOSTSENT: irq_host={sent_total}"));
    let _ = memory.store(1u32, GuestAddress(ready.stop), Ordering::Release);
    pulse(&devices, WAKE_LINE);
    out
}

/// One host-driven workload: `send` at each open-loop rate (`HOSTRATE:`), then a closed loop
/// (`HOSTLAT:`, `HOSTSAMPLES:`). Returns how many it sent.
fn drive_one(
    vm: &RunningVm,
    count: &dyn Fn() -> u64,
    finished: &AtomicBool,
    spec: &ChildSpec,
    name: &str,
    send: &dyn Fn(),
    out: &mut Vec<String>,
) -> u64 {
    let mut sent_total = 0u64;
    for &hz in &spec.rates {
        // Host CPU time of the VMM at this offered rate: the process minus this driver thread.
        let (c0, cpu0, drv0) = (count(), own_cpu_ns(), thread_cpu_ns());
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
            send();
        }
        let elapsed = start.elapsed();
        sent_total += u64::from(spec.pulses);
        let delivered = settle(&count, c0, u64::from(spec.pulses));
        let cpu = (own_cpu_ns() - cpu0).saturating_sub(thread_cpu_ns() - drv0);
        out.push(format!(
            "HOSTRATE: name={name} hz={hz} sent={} delivered={delivered} elapsed_ns={} cpu_ns={cpu}",
            spec.pulses,
            elapsed.as_nanos()
        ));
    }
    // Closed loop: each interrupt waits for the previous one to be counted. Marked like a guest
    // workload, with the same quiet pauses, for the parent's per-workload syscall counts.
    mark(vm, "begin", name, out);
    let trace_to = closed_loop_trace(vm, name);
    let (c0, exits0, cpu0, drv0) = (count(), exits_so_far(vm), own_cpu_ns(), thread_cpu_ns());
    let mut samples = Vec::new();
    for _ in 0..spec.pulses {
        let before = count();
        let t0 = Instant::now();
        send();
        while count() == before
            && t0.elapsed() < Duration::from_secs(1)
            && !finished.load(Ordering::SeqCst)
        {
            std::hint::spin_loop();
        }
        samples.push(t0.elapsed().as_nanos().to_string());
    }
    let (c1, exits1, cpu1, drv1) = (count(), exits_so_far(vm), own_cpu_ns(), thread_cpu_ns());
    if let Some(path) = trace_to {
        save_trace(vm, &path, out);
    }
    mark(vm, "end", name, out);
    sent_total += u64::from(spec.pulses);
    let cpu = (cpu1 - cpu0).saturating_sub(drv1 - drv0);
    out.push(format!(
        "HOSTLAT: name={name} sent={} counted={} exits={} cpu_ns={cpu}",
        spec.pulses,
        c1 - c0,
        exits1 - exits0
    ));
    for chunk in samples.chunks(16) {
        out.push(format!("HOSTSAMPLES: name={name} {}", chunk.join(" ")));
    }
    sent_total
}

/// IRQVM_BENCH_TRACE_DIR=DIR: the flight recorder on over the closed loop of workload `name`
/// (where each microsecond goes: docs/benchmarks.md, issue 14), saved to DIR/NAME.json
/// (Chrome trace format, `irqvm trace` reads it) when the loop ends.
fn closed_loop_trace(vm: &RunningVm, name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("IRQVM_BENCH_TRACE_DIR")?;
    if let Err(e) = vm.tracer().start() {
        eprintln!("{name}: flight recorder: {e}");
        return None;
    }
    Some(std::path::Path::new(&dir).join(format!("{name}.json")))
}

fn save_trace(vm: &RunningVm, path: &std::path::Path, out: &mut Vec<String>) {
    let saved = vm
        .tracer()
        .stop()
        .and_then(|dump| irqvm::trace::chrome::write_file(&dump, path));
    match saved {
        Ok(()) => out.push(format!("TRACE: {}", path.display())),
        Err(e) => out.push(format!("TRACE: {} not written: {e}", path.display())),
    }
}

/// Prints a `MARK:` line now (the guest is halted and prints nothing meanwhile), records the
/// counters, and pauses as the guests do after a mark (`bench.h`, PAUSE_MS). A begin mark is
/// also preceded by a pause, as a guest's is by the previous workload's end pause: the open
/// loop before it makes syscalls of its own (sleeps, yields).
fn mark(vm: &RunningVm, edge: &str, name: &str, out: &mut Vec<String>) {
    if edge == "begin" {
        std::thread::sleep(Duration::from_millis(30));
    }
    println!("MARK: {edge} {name}");
    out.push(counters_line(vm, edge, name));
    std::thread::sleep(Duration::from_millis(30));
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
    crate::runner::process_cpu_ns(std::process::id())
}
