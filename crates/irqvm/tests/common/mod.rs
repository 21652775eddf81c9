//! Shared helpers of the integration tests: run a VM on a helper thread with a hard timeout,
//! run the guest test kernels and compare what they print with guests/expect (`expect`), build
//! tiny raw / ELF64 / a.out guests from machine code.
#![allow(dead_code)]

pub mod api;
pub mod expect;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use irqvm::devices::{SerialCapture, SerialOutput};
use irqvm::loader::{CpuMode, RawImage};
use irqvm::vcpu::VcpuState;
use irqvm::vm::{RunReport, RunningVm, Vm, VmConfig, VmError};
use irqvm::IrqchipMode;

/// How long the VM may run before `Vm::run` stops it.
pub const VM_TIMEOUT: Duration = Duration::from_secs(30);
/// The harness's own limit: a VM that cannot even be stopped fails the test instead of
/// hanging it.
pub const HARNESS_TIMEOUT: Duration = Duration::from_secs(45);

/// The result of a guest run plus everything it printed.
pub struct GuestRun {
    pub result: Result<RunReport, VmError>,
    pub output: String,
}

impl GuestRun {
    /// Asserts that the run of `guest` in `mode` on `cpus` vCPUs printed exactly what
    /// guests/expect/`guest`.txt says (see [`expect::Expectations::verify`]) and ended with the
    /// exit status its DONE line implies (debug-exit 0 gives 1, debug-exit 1 after a FAIL gives 3).
    /// Panics listing every difference, then the output. Returns the tolerated host-limit
    /// failures, which are also printed to stderr.
    pub fn assert_expected(&self, guest: &str, mode: IrqchipMode, cpus: u32) -> Vec<String> {
        let what = format!("{guest} on {cpus} vCPU(s), {mode:?} irqchip");
        let report = self
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{what}: {e}\n--- output ---\n{}", self.output));
        let verdict = expect::Expectations::load(guest)
            .verify(mode, cpus, &self.output)
            .unwrap_or_else(|problems| {
                panic!(
                    "{what}: the run differs from guests/expect/{guest}.txt:\n{problems}--- output ---\n{}",
                    self.output
                )
            });
        let failed = expect::done_counts(&self.output).map_or(0, |(_, failed)| failed);
        let status = if failed == 0 { 1 } else { 3 };
        assert_eq!(
            report.exit.exit_status(),
            status,
            "{what}: exit status (debug-exit {} gives {status}):\n{}",
            status >> 1,
            self.output
        );
        for check in &verdict.tolerated {
            eprintln!("{what}: host limit met, as listed: {check}");
        }
        verdict.tolerated
    }
}

/// Runs `cfg` with serial captured, under both timeouts.
pub fn run_vm(cfg: VmConfig) -> GuestRun {
    run_vm_for(cfg, VM_TIMEOUT)
}

/// [`run_vm`] with the VM stopped after `timeout` (the harness waits 15 s more).
pub fn run_vm_for(mut cfg: VmConfig, timeout: Duration) -> GuestRun {
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::Capture(capture.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = Vm::new(&cfg).and_then(|vm| vm.run(Some(timeout)));
        let _ = tx.send(result);
    });
    let result = rx
        .recv_timeout(timeout + (HARNESS_TIMEOUT - VM_TIMEOUT))
        .unwrap_or_else(|_| panic!("VM did not stop:\n{}", capture.text()));
    GuestRun {
        result,
        output: capture.text(),
    }
}

/// The path of a guest built by build.rs.
pub fn guest_path(name: &str) -> String {
    format!("{}/{name}.elf", irqvm::GUESTS_DIR)
}

/// The config of guest `name` on `cpus` vCPUs in `mode`.
pub fn guest_config(name: &str, cpus: u32, mode: IrqchipMode) -> VmConfig {
    let path = guest_path(name);
    let kernel = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut cfg = VmConfig::new(kernel, &format!("{name}.elf"));
    cfg.cpus = cpus;
    cfg.irqchip = mode;
    cfg
}

/// Runs guest `name` on `cpus` vCPUs in `mode`.
pub fn run_guest(name: &str, cpus: u32, mode: IrqchipMode) -> GuestRun {
    run_vm(guest_config(name, cpus, mode))
}

/// A VM config for raw machine code loaded and entered at 1 MiB, in `kernel` irqchip mode (the
/// mode the tests built on it were written for, e.g. an AP waiting for SIPI inside KVM_RUN in
/// `kick.rs`; the tests of other modes set theirs).
pub fn raw_config(code: &[u8], mode: CpuMode, cpus: u32) -> VmConfig {
    let mut cfg = VmConfig::new(code.to_vec(), "raw");
    cfg.irqchip = IrqchipMode::Kernel;
    cfg.cpus = cpus;
    cfg.memory = 16 << 20;
    cfg.raw = Some(RawImage {
        load_addr: 0x10_0000,
        entry: 0x10_0000,
        mode,
    });
    cfg
}

/// `mov eax, value; out 0xF4, eax` (32- and 64-bit code).
pub fn debug_exit32(value: u32) -> Vec<u8> {
    let mut code = vec![0xB8];
    code.extend_from_slice(&value.to_le_bytes());
    code.extend_from_slice(&[0xE7, 0xF4]);
    code
}

/// `jmp $`.
pub const SPIN: [u8; 2] = [0xEB, 0xFE];
/// `cli; hlt; jmp $-1`.
pub const HALT_FOREVER: [u8; 4] = [0xFA, 0xF4, 0xEB, 0xFD];

/// The storm guest on `cpus` vCPUs while a host thread pulses IOAPIC line 10 under the guest's
/// `host_link` handshake (guests/storm.c): one host edge outstanding at a time, and none after
/// the guest closed the window. Returns the run and what the host thread did.
pub fn run_storm_with_host_line(mode: IrqchipMode, cpus: u32) -> (GuestRun, HostLine) {
    let (run, host) = run_with_host_thread("storm", mode, cpus, pulse_host_line);
    let host = host.unwrap_or_else(|_| panic!("the pulsing thread panicked:\n{}", run.output));
    (run, host)
}

/// Runs guest `name` on `cpus` vCPUs in `mode` with `host` running on a thread of its own beside
/// it (given the running VM and the serial capture), then waits for the VM to end. Returns the
/// run and what `host` returned (`Err` if it panicked).
pub fn run_with_host_thread<T: Send + 'static>(
    name: &str,
    mode: IrqchipMode,
    cpus: u32,
    host: fn(&RunningVm, &SerialCapture) -> T,
) -> (GuestRun, std::thread::Result<T>) {
    run_cfg_with_host_thread(guest_config(name, cpus, mode), host)
}

/// [`run_with_host_thread`] with a config of the caller's (for guests that need a VM option).
pub fn run_cfg_with_host_thread<T: Send + 'static>(
    mut cfg: VmConfig,
    host: fn(&RunningVm, &SerialCapture) -> T,
) -> (GuestRun, std::thread::Result<T>) {
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::Capture(capture.clone());
    let (tx, rx) = mpsc::channel();
    {
        let capture = capture.clone();
        std::thread::spawn(move || {
            let vm = Vm::new(&cfg).unwrap().start().unwrap();
            let out = std::thread::scope(|s| s.spawn(|| host(&vm, &capture)).join());
            let _ = tx.send((vm.wait(Some(VM_TIMEOUT)), out));
        });
    }
    let (result, out) = rx.recv_timeout(HARNESS_TIMEOUT).expect("VM did not stop");
    let run = GuestRun {
        result,
        output: capture.text(),
    };
    (run, out)
}

/// The guest's `host_link` words: the guest writes `stop`, counts `dev10` and sets `dump_req`
/// when an IPI is missing; the host writes `busy` and `dump_done`.
const LINK_STOP: u64 = 0;
const LINK_BUSY: u64 = 4;
const LINK_DEV10: u64 = 8;
const LINK_DUMP_REQ: u64 = 12;
const LINK_DUMP_DONE: u64 = 16;
/// The line the host drives (the guest pulses line 11 itself).
const HOST_LINE: u32 = 10;

/// What storm's host thread did: its pulses of line 10, and the vCPUs' interrupt state if the
/// guest found an IPI missing and asked for it (`dump_req`).
#[derive(Debug, Default)]
pub struct HostLine {
    pub pulses: u32,
    pub dump: Option<String>,
}

/// The host half of storm.c's handshake: `busy` = 1, then read `stop` (the guest writes `stop`,
/// then reads `busy`: one side always sees the other), pulse, wait until the guest counted it,
/// `busy` = 0. Bounded by the VM's end. Once the guest closed the window, dumps every vCPU's
/// interrupt state if the guest asked (it sets `dump_req` before `stop`); also once
/// [`DUMP_BEFORE_TIMEOUT`] before the VM's timeout if the guest is still storming then, so that a
/// run about to time out shows where each vCPU stood.
pub fn pulse_host_line(vm: &RunningVm, capture: &SerialCapture) -> HostLine {
    let start = Instant::now();
    let over = || start.elapsed() > VM_TIMEOUT || vm.vcpu(0).state() == VcpuState::Stopped;
    let Some(link) = wait_for_host_link(capture, &over) else {
        return HostLine::default();
    };
    let word = |offset| {
        vm.load_guest_u32(link + offset)
            .expect("host_link is in RAM")
    };
    let mut pulses = 0;
    let mut dump = None;
    loop {
        assert!(
            vm.store_guest_u32(link + LINK_BUSY, 1),
            "{link:#x} is not in RAM"
        );
        if word(LINK_STOP) != 0 || over() {
            vm.store_guest_u32(link + LINK_BUSY, 0);
            if word(LINK_DUMP_REQ) != 0 {
                dump = Some(dump_interrupt_state(vm));
            }
            vm.store_guest_u32(link + LINK_DUMP_DONE, 1);
            return HostLine { pulses, dump };
        }
        let counted = word(LINK_DEV10);
        vm.irqchip().pulse_line(HOST_LINE).unwrap();
        pulses += 1;
        while word(LINK_DEV10) == counted && !over() {
            dump_if_near_timeout(vm, start, &mut dump);
            std::thread::sleep(Duration::from_micros(50));
        }
        dump_if_near_timeout(vm, start, &mut dump);
        vm.store_guest_u32(link + LINK_BUSY, 0);
        std::thread::sleep(Duration::from_micros(300));
    }
}

/// How long before the VM's timeout storm's host thread dumps the vCPUs of a guest still storming.
const DUMP_BEFORE_TIMEOUT: Duration = Duration::from_secs(3);

/// The first time the host thread (started at `start`) comes within [`DUMP_BEFORE_TIMEOUT`] of the
/// VM's timeout, `dump` = every vCPU's interrupt state (the guest has not ended its storm by then).
fn dump_if_near_timeout(vm: &RunningVm, start: Instant, dump: &mut Option<String>) {
    if dump.is_none() && start.elapsed() > VM_TIMEOUT - DUMP_BEFORE_TIMEOUT {
        let state = dump_interrupt_state(vm);
        *dump = Some(format!(
            "(the guest was still storming {} s after the host thread started)\n{state}",
            (VM_TIMEOUT - DUMP_BEFORE_TIMEOUT).as_secs()
        ));
    }
}

/// Every vCPU's interrupt state as the control API reads it on the vCPU's thread (kicked out of
/// KVM_RUN): thread and MP state, RIP, the local APIC's IRR, ISR, TMR, TPR and PPR
/// (KVM_GET_LAPIC in `kernel` and `split` mode, the model in `user` mode) and the pending events
/// (KVM_GET_VCPU_EVENTS: the vector being injected, the interrupt shadow, NMIs). One line each.
pub fn dump_interrupt_state(vm: &RunningVm) -> String {
    use irqvm::api::router::Control;
    let handle = vm.handle();
    let line = |index: usize| match handle.vcpu(index) {
        Ok(v) => format!(
            "vCPU {index}: thread={} mp_state={} rip={:#x} irr={:x?} isr={:x?} tmr={:x?} tpr={:#x} \
             ppr={:#x} injecting={:x?} shadow={} nmis={} nmi_masked={}",
            v.thread,
            v.mp_state,
            v.rip,
            v.lapic.irr,
            v.lapic.isr,
            v.lapic.tmr,
            v.lapic.tpr,
            v.lapic.ppr,
            v.pending.injecting,
            v.pending.interrupt_shadow,
            v.pending.nmis,
            v.pending.nmi_masked
        ),
        Err(e) => format!("vCPU {index}: not read: {e}"),
    };
    (0..vm.vcpu_count())
        .map(line)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The address in "STORM: start host_link=0x..." once the guest printed the whole line.
fn wait_for_host_link(capture: &SerialCapture, over: &dyn Fn() -> bool) -> Option<u64> {
    loop {
        let text = capture.text();
        let line = text
            .split("STORM: start host_link=0x")
            .nth(1)
            .and_then(|rest| rest.split_once('\n'));
        if let Some((line, _)) = line {
            let hex: String = line.chars().take_while(char::is_ascii_hexdigit).collect();
            return Some(u64::from_str_radix(&hex, 16).expect("an address"));
        }
        if over() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The storm run passed, and its counts are exact: every IPI sent was received once, the guest's
/// 20 pulses of line 11 gave 20 interrupts, and the host's pulses of line 10 gave exactly as
/// many interrupts. A failure shows the host's dump of the vCPUs' interrupt state if the guest
/// asked for one (an IPI missing).
pub fn assert_storm_counts_exact(
    run: &GuestRun,
    mode: IrqchipMode,
    cpus: u32,
    host: &HostLine,
    what: &str,
) {
    if let Some(dump) = &host.dump {
        // Before the checks below, so that whichever fails, the dump is in the test's output.
        eprintln!(
            "{what}: IPIs missing or the run about to time out; interrupt state then:\n{dump}"
        );
    }
    let pulses = host.pulses;
    run.assert_expected("storm", mode, cpus);
    let line = run
        .output
        .lines()
        .find(|l| l.starts_with("COUNT: ipi_sent="))
        .unwrap_or_else(|| panic!("{what}: no COUNT line:\n{}", run.output));
    // Every field follows a space, so " dev=" does not match "dev10=".
    let field = |name: &str| -> u32 {
        let v = line.split(&format!(" {name}=")).nth(1).unwrap();
        v.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (sent, received) = (field("ipi_sent"), field("ipi_received"));
    let (dev, dev10, dev11) = (field("dev"), field("dev10"), field("dev11"));
    assert_eq!(sent, 200 * cpus, "{what}: IPIs sent\n{}", run.output);
    assert_eq!(received, sent, "{what}: IPIs received\n{}", run.output);
    assert!(pulses > 0, "{what}: the host never pulsed\n{}", run.output);
    assert_eq!(
        dev10, pulses,
        "{what}: host pulses of line 10\n{}",
        run.output
    );
    assert_eq!(dev11, 20, "{what}: guest pulses of line 11\n{}", run.output);
    assert_eq!(
        dev,
        dev10 + dev11,
        "{what}: device interrupts\n{}",
        run.output
    );
    // Which pairs' last IPI had not landed when the last sender finished (docs/irqchip-modes.md,
    // "The storm's IPI count"): the figures of that section come from these lines.
    let late: Vec<&str> = run
        .output
        .lines()
        .filter_map(|l| l.strip_prefix("COUNT: late ipi "))
        .collect();
    eprintln!("{what}: {pulses} host pulses; {line}; late: {late:?}");
}

/// One guest VM at a time per test binary: the guests time themselves with the TSC (a 1 ms APIC
/// count must still be running at the next register read), and a dozen VMs on 2 shared cores
/// would starve their vCPU threads for milliseconds.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the one-VM-at-a-time lock while the guard lives.
pub fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The largest vCPU count [`check_guest`] runs: every guest lists 1, 2 and 4. A guest that lists
/// larger counts (`x2apic_boot`) runs them in tests of their own ([`check_guest_with`]), one
/// count per test, so that each stays CI-sized.
pub const SMALL_COUNTS_MAX: u32 = 4;

/// Runs guest `name` alone in `mode` on every vCPU count up to [`SMALL_COUNTS_MAX`] that
/// guests/expect/`name`.txt lists, one VM at a time, and asserts each run printed what the file
/// expects (see [`GuestRun::assert_expected`]).
pub fn check_guest(name: &str, mode: IrqchipMode) -> Vec<GuestRun> {
    expect::Expectations::load(name)
        .cpu_counts()
        .into_iter()
        .filter(|&cpus| cpus <= SMALL_COUNTS_MAX)
        .map(|cpus| {
            let _one = exclusive();
            let run = run_guest(name, cpus, mode);
            run.assert_expected(name, mode, cpus);
            run
        })
        .collect()
}

/// Runs guest `name` once in `mode` on `cpus` vCPUs with `edit` applied to its VM config (a
/// `--topology`, `--cpu-features`, a command line), and asserts the run printed what
/// guests/expect/`name`.txt lists for that count. Returns the run (its report has the timing).
pub fn check_guest_with(
    name: &str,
    mode: IrqchipMode,
    cpus: u32,
    edit: impl FnOnce(&mut VmConfig),
) -> GuestRun {
    check_guest_for(name, mode, cpus, edit, VM_TIMEOUT)
}

/// [`check_guest_with`] with the VM stopped after `timeout` instead of [`VM_TIMEOUT`].
pub fn check_guest_for(
    name: &str,
    mode: IrqchipMode,
    cpus: u32,
    edit: impl FnOnce(&mut VmConfig),
    timeout: Duration,
) -> GuestRun {
    let _one = exclusive();
    let mut cfg = guest_config(name, cpus, mode);
    edit(&mut cfg);
    let run = run_vm_for(cfg, timeout);
    run.assert_expected(name, mode, cpus);
    if let Ok(report) = &run.result {
        eprintln!("{name} on {cpus} vCPUs, {mode:?}: {:?}", report.elapsed);
    }
    run
}

/// `x2apic_boot` with `--topology sockets=2,dies=2,cores=3,threads=2` (24 vCPUs, APIC IDs with
/// gaps: 3 cores take 2 bits) and the same topology on its command line, so the guest checks
/// CPUID leaves 1, 4, 0BH, 1FH and the APIC IDs against it.
pub fn check_x2apic_boot_topology(mode: IrqchipMode) {
    check_guest_with("x2apic_boot", mode, 24, |cfg| {
        cfg.topology = Some("sockets=2,dies=2,cores=3,threads=2".parse().unwrap());
        cfg.cmdline = "topo=2,2,3,2".into();
    });
}

/// `x2apic_boot` on an xAPIC-only machine without the TSC-deadline timer (`--cpu-features
/// -x2apic,-tsc-deadline`): CPUID must show neither, setting EXTD must #GP, and every start-up
/// and IPI check passes in xAPIC mode.
pub fn check_x2apic_boot_xapic_only(mode: IrqchipMode) {
    check_guest_with("x2apic_boot", mode, 4, |cfg| {
        cfg.cpu_features = "-x2apic,-tsc-deadline".parse().unwrap();
        cfg.cmdline = "x2apic=0 tscdl=0".into();
    });
}

/// The `x2apic_boot` tests of one mode beyond `guest_tests!`'s 1, 2 and 4 vCPUs: one test per
/// CI-sized count (`$name = $cpus`), the `--topology` and xAPIC-only runs, and the counts that
/// only fit the benchmark's budget as ignored tests (`cargo test -- --ignored` runs them).
#[macro_export]
macro_rules! x2apic_boot_tests {
    ($mode:expr; ci: $($name:ident = $cpus:expr),+; too_slow: $($slow:ident = $slow_cpus:expr),*) => {
        $(
            #[test]
            fn $name() {
                // 10-25 s on an idle 2-core host; the margin is for a loaded one (288 vCPUs in
                // `kernel` mode took over 60 s beside a 4-vCPU Linux boot run at high priority).
                let bound = std::time::Duration::from_secs(180);
                $crate::common::check_guest_for("x2apic_boot", $mode, $cpus, |_| {}, bound);
            }
        )+
        $(
            #[test]
            #[ignore = "over a CI-sized run on the 2-core host (docs/benchmarks.md, \"Large vCPU counts\")"]
            fn $slow() {
                let ten_minutes = std::time::Duration::from_secs(600);
                $crate::common::check_guest_for("x2apic_boot", $mode, $slow_cpus, |_| {}, ten_minutes);
            }
        )*
        #[test]
        fn x2apic_boot_with_topology() {
            $crate::common::check_x2apic_boot_topology($mode);
        }
        #[test]
        fn x2apic_boot_xapic_only_without_tsc_deadline() {
            $crate::common::check_x2apic_boot_xapic_only($mode);
        }
    };
}

/// [`check_guest`] for a guest that needs a VM option: `option` adjusts each run's config.
pub fn check_guest_with_option(name: &str, mode: IrqchipMode, option: fn(&mut VmConfig)) {
    for cpus in expect::Expectations::load(name).cpu_counts() {
        let _one = exclusive();
        let mut cfg = guest_config(name, cpus, mode);
        option(&mut cfg);
        run_vm(cfg).assert_expected(name, mode, cpus);
    }
}

/// `syscall` (guests/syscall.c): the checks of its expectation file, and on a kvm_pvm host the
/// SYSCALL watch's counters (`emulate::syscall`): every SYSCALL the guest makes from 64-bit user
/// mode finished by irqvm (two round trips of two), plus the second SYSCALL of each of the two
/// compatibility-mode round trips, which runs in 64-bit mode because the host's SYSRETL returns
/// to CS 33H (docs/kvm-facts.md, "SYSCALL and SYSRET here"); the host completes the SYSCALLs from
/// compatibility mode (to CSTAR) itself, with no hit. On an Intel host those compatibility-mode
/// SYSCALLs raise #UD instead (no SYSRETL, no second SYSCALL), so irqvm finishes only the four.
/// The page-fault handler breakpoint hits those six (four) and the guest's two ordinary page
/// faults, which must reach the guest once each. Elsewhere the watch is never armed.
pub fn check_syscall(mode: IrqchipMode) {
    let _one = exclusive();
    let run = run_guest("syscall", 1, mode);
    run.assert_expected("syscall", mode, 1);
    let report = run.result.as_ref().expect("the VM runs");
    let vcpu = &report.vcpus[0];
    let compat_round_trips = match expect::host_vendor() {
        expect::Vendor::Intel => 0,
        _ => 2,
    };
    let (completed, hits) = if irqvm::emulate::syscall::host_needs_it() {
        (4 + compat_round_trips, 6 + compat_round_trips)
    } else {
        (0, 0)
    };
    assert_eq!(
        (vcpu.syscalls_completed, vcpu.syscall_watch_hits),
        (completed, hits),
        "SYSCALLs finished by irqvm, watch hits\n{}",
        run.output
    );
}

/// `syscall_smp` (guests/syscall_smp.c) on 1, 2 and 4 vCPUs: the checks of its expectation file
/// (FS and GS bases written inside system calls on every CPU at once, under timer interrupts,
/// IPIs, context switches and demand faults on the TLS pages), and on a kvm_pvm host the SYSCALL
/// watch's counters: irqvm finished both SYSCALLs of every round trip the guest reports ("INFO: N
/// round trips"), and the breakpoint hit those and the guest's page faults ("INFO: N page
/// faults"), each once. Elsewhere the watch is never armed.
pub fn check_syscall_smp(mode: IrqchipMode) {
    let count = |output: &str, what: &str| -> u64 {
        output
            .lines()
            .find_map(|l| l.strip_prefix("INFO: ")?.strip_suffix(what))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no \"{what}\" line:\n{output}"))
    };
    for cpus in expect::Expectations::load("syscall_smp").cpu_counts() {
        let _one = exclusive();
        let run = run_guest("syscall_smp", cpus, mode);
        run.assert_expected("syscall_smp", mode, cpus);
        let report = run.result.as_ref().expect("the VM runs");
        let trips = count(&run.output, " round trips (SYSCALL 1 and 2 each) in all");
        let faults = count(&run.output, " page faults in all");
        let completed: u64 = report.vcpus.iter().map(|v| v.syscalls_completed).sum();
        let hits: u64 = report.vcpus.iter().map(|v| v.syscall_watch_hits).sum();
        let expected = if irqvm::emulate::syscall::host_needs_it() {
            (2 * trips, 2 * trips + faults)
        } else {
            (0, 0)
        };
        assert_eq!(
            (completed, hits),
            expected,
            "{cpus} vCPUs: SYSCALLs finished by irqvm, watch hits ({trips} round trips, {faults} page faults)\n{}",
            run.output
        );
    }
}

/// `tlb_shootdown` (guests/tlb_shootdown.c) on 1, 2 and 4 vCPUs: the checks of its expectation
/// file (a user-mode reader never sees a stale page after an IPI flush, with INVLPG or a CR3
/// reload), and the figures of its other phases on stderr: the flushes through the readers'
/// steal-time records (Linux's KVM_FEATURE_PV_TLB_FLUSH path), the no-flush controls, how often
/// the host showed a reader as preempted, whether it rewrites a FLUSH_TLB the guest set, and a
/// `HOST-BUG pv-tlb-flush` line if a reader saw a stale page after such a flush. That line is the
/// host's (it needs a preempted reader, which only a loaded host gives), so it is recorded, not
/// failed on.
pub fn check_tlb_shootdown(mode: IrqchipMode) {
    for cpus in expect::Expectations::load("tlb_shootdown").cpu_counts() {
        let _one = exclusive();
        let run = run_guest("tlb_shootdown", cpus, mode);
        run.assert_expected("tlb_shootdown", mode, cpus);
        for line in run.output.lines().filter(|l| {
            l.starts_with("COUNT: phase")
                || l.starts_with("HOST-BUG")
                || l.starts_with("INFO: the readers' preempted bytes")
                || l.contains("preempted byte set to FLUSH_TLB")
        }) {
            eprintln!("tlb_shootdown on {cpus} vCPU(s), {mode:?}: {line}");
        }
    }
}

/// One `#[test]` per guest, named after it, that runs it alone in `$mode` with [`check_guest`];
/// also defines `STANDALONE`, the list of those guests, for [`assert_every_guest_runs`].
#[macro_export]
macro_rules! guest_tests {
    ($mode:expr; $($name:ident),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::common::check_guest(stringify!($name), $mode);
            }
        )+
        /// The guests this file runs alone (one test each).
        const STANDALONE: &[&str] = &[$(stringify!($name)),+];
    };
}

/// Every guest that exists (`expect::all_guests`) and runs in `mode` (its expectation file's
/// column for `mode` is not all `-`: `protected_aps` runs only in `user` mode) is run by a test
/// of this mode: alone (`standalone`, from [`guest_tests!`]) or by a test of its own
/// (`others`: beside a host thread, or with a VM option).
pub fn assert_every_guest_runs(mode: IrqchipMode, standalone: &[&str], others: &[&str]) {
    let covered: std::collections::BTreeSet<&str> =
        standalone.iter().chain(others).copied().collect();
    let missing: Vec<String> = expect::all_guests()
        .into_iter()
        .filter(|g| expect::Expectations::load(g).runs_in(mode))
        .filter(|g| !covered.contains(g.as_str()))
        .collect();
    for g in standalone.iter().chain(others) {
        assert!(
            expect::Expectations::load(g).runs_in(mode),
            "{g} is run in {mode:?} mode although guests/expect/{g}.txt says `-` there"
        );
    }
    assert!(
        missing.is_empty(),
        "guests with no test in this mode: {missing:?} (add them to guest_tests!)"
    );
}

/// The storm guest on 2 and 4 vCPUs while a host thread pulses IOAPIC line 10 (storm.c's
/// `host_link` handshake: one host edge outstanding at a time, none after the guest closed the
/// window): every IPI sent is received exactly once, and the guest counts exactly the device
/// interrupts raised, the host's pulses of line 10 and its own 20 of line 11.
pub fn check_storm_with_host_line(mode: IrqchipMode) {
    for cpus in [2, 4] {
        let _one = exclusive();
        let (run, host) = run_storm_with_host_line(mode, cpus);
        assert_storm_counts_exact(
            &run,
            mode,
            cpus,
            &host,
            &format!("storm, host line, {cpus} vCPUs, {mode:?}"),
        );
    }
}

/// msi.c's vector and its `msi_link` layout (see the guest's header).
const MSI_VECTOR: u32 = 0x61;
const MSI_LINK_ATTACHED: u64 = 0;
const MSI_LINK_DONE: u64 = 4;
const MSI_LINK_COUNT: u64 = 8;
const MSI_LINK_EXPECTED: u64 = 8 + 4 * 16;
const MSI_LINK_NMIS: u64 = 8 + 2 * 4 * 16;
/// MSI data, delivery mode NMI (100b, bits 10:8; the vector is ignored: SDM vol. 3 §11.11.2).
const MSI_NMI: u32 = 4 << 8;
/// MSIs of each kind the host sends.
pub const MSIS_PER_KIND: u32 = 20;
/// SDM vol. 3 §11.11.1-2: address 0xFEE, destination ID in bits 19:12, DM (logical) bit 2,
/// RH bit 3; data: vector, delivery mode in bits 10:8, edge trigger.
const MSI_BASE: u64 = 0xFEE0_0000;
const MSI_LOGICAL: u64 = 1 << 2;
const MSI_REDIRECTION_HINT: u64 = 1 << 3;
const MSI_LOWEST_PRIORITY: u32 = 1 << 8;

/// What the host thread of [`run_msi_from_host`] found.
#[derive(Debug, Default)]
pub struct MsiRun {
    /// MSIs the API accepted and the guest counted, per vCPU.
    pub delivered: Vec<u32>,
    /// Each kind's name and how many of its MSIs were taken by the CPU(s) they addressed.
    pub kinds: Vec<(&'static str, u32)>,
    /// The API's answers to the malformed messages (must all be `InvalidMsi`).
    pub malformed: Vec<String>,
    /// The API's answer to a well-formed MSI for an APIC ID no vCPU has.
    pub no_target: Option<String>,
    /// Per-vCPU counts unchanged across the malformed and no-target messages.
    pub nothing_after_refused: bool,
    /// With 2+ vCPUs: the NMIs CPU 1 counted of two sent back to back while it idled in HLT
    /// (`None` with one vCPU).
    pub nmi_pair: Option<u32>,
}

/// msi.c on `cpus` vCPUs in `mode` while a host thread sends it MSIs through
/// `RunningVm::signal_msi`, one at a time: each is sent only after the previous one was counted
/// by the guest (read from guest memory), so none can merge in an IRR bit.
pub fn run_msi_from_host(mode: IrqchipMode, cpus: u32) -> (GuestRun, MsiRun) {
    let (run, msi) = run_with_host_thread("msi", mode, cpus, send_msis);
    let msi = msi.unwrap_or_else(|_| panic!("the MSI thread panicked:\n{}", run.output));
    (run, msi)
}

/// The `READY: msi link=0x...` address and `MSI: cpu C apic_id=A ldr=L` lines, once printed.
fn wait_for_msi_ready(
    capture: &SerialCapture,
    over: &dyn Fn() -> bool,
) -> Option<(u64, Vec<(u32, u32)>)> {
    loop {
        let text = capture.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(line) = complete
            .lines()
            .find(|l| l.starts_with("READY: msi link=0x"))
        {
            let hex: String = line["READY: msi link=0x".len()..]
                .chars()
                .take_while(char::is_ascii_hexdigit)
                .collect();
            let link = u64::from_str_radix(&hex, 16).expect("an address");
            let value = |line: &str, key: &str, radix| {
                let w = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
                u32::from_str_radix(w, radix).ok()
            };
            let cpus = complete
                .lines()
                .filter(|l| l.starts_with("MSI: cpu "))
                .filter_map(|l| Some((value(l, "apic_id=", 10)?, value(l, "ldr=", 16)?)))
                .collect();
            return Some((link, cpus));
        }
        if over() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn send_msis(vm: &RunningVm, capture: &SerialCapture) -> MsiRun {
    let start = Instant::now();
    let over = || start.elapsed() > VM_TIMEOUT || vm.vcpu(0).state() == VcpuState::Stopped;
    let mut out = MsiRun::default();
    let Some((link, cpus)) = wait_for_msi_ready(capture, &over) else {
        return out;
    };
    let word = |offset: u64| {
        vm.load_guest_u32(link + offset)
            .expect("msi_link is in RAM")
    };
    let counts = || -> Vec<u32> {
        (0..cpus.len() as u64)
            .map(|c| word(MSI_LINK_COUNT + 4 * c))
            .collect()
    };
    assert!(vm.store_guest_u32(link + MSI_LINK_ATTACHED, 1));
    out.delivered = vec![0; cpus.len()];
    // One MSI, then wait (bounded) until one more interrupt was counted; returns the CPU that
    // took it.
    let send_one = |address: u64, data: u32| -> Option<usize> {
        let before = counts();
        let result = vm.signal_msi(address, data);
        assert!(
            matches!(result, Ok(irqvm::backend::MsiDelivery::Delivered)),
            "MSI {address:#x}/{data:#x}: {result:?}"
        );
        let t0 = Instant::now();
        loop {
            let now = counts();
            if now.iter().sum::<u32>() > before.iter().sum::<u32>() {
                return now.iter().zip(&before).position(|(a, b)| a > b);
            }
            if t0.elapsed() > Duration::from_secs(5) || over() {
                return None;
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    };
    let mut kinds: Vec<(&'static str, u64, u32, Vec<usize>)> = vec![(
        "fixed physical to cpu 0",
        MSI_BASE | u64::from(cpus[0].0) << 12,
        MSI_VECTOR,
        vec![0],
    )];
    if cpus.len() >= 2 {
        kinds.push((
            "fixed physical to cpu 1",
            MSI_BASE | u64::from(cpus[1].0) << 12,
            MSI_VECTOR,
            vec![1],
        ));
        kinds.push((
            "fixed logical to cpu 1",
            MSI_BASE | MSI_LOGICAL | u64::from(cpus[1].1) << 12,
            MSI_VECTOR,
            vec![1],
        ));
        kinds.push((
            "lowest priority logical to cpus 0-1",
            MSI_BASE | MSI_LOGICAL | MSI_REDIRECTION_HINT | u64::from(cpus[0].1 | cpus[1].1) << 12,
            MSI_LOWEST_PRIORITY | MSI_VECTOR,
            vec![0, 1],
        ));
    }
    for (name, address, data, targets) in kinds {
        let mut right = 0;
        for _ in 0..MSIS_PER_KIND {
            if let Some(cpu) = send_one(address, data) {
                out.delivered[cpu] += 1;
                right += u32::from(targets.contains(&cpu));
            }
        }
        out.kinds.push((name, right));
    }
    // Refused by the API; and a well-formed one nobody has the APIC ID of.
    let before = counts();
    for (address, data) in [
        (0xFED0_0000, MSI_VECTOR),
        (0x1_FEE0_0000, MSI_VECTOR),
        (MSI_BASE, 3 << 8 | MSI_VECTOR),
        (MSI_BASE, 6 << 8 | MSI_VECTOR),
    ] {
        out.malformed
            .push(format!("{:?}", vm.signal_msi(address, data)));
    }
    out.no_target = Some(format!(
        "{:?}",
        vm.signal_msi(MSI_BASE | 0x7E << 12, MSI_VECTOR)
    ));
    std::thread::sleep(Duration::from_millis(50));
    out.nothing_after_refused = counts() == before;
    if cpus.len() >= 2 {
        out.nmi_pair = Some(send_nmi_pair(vm, link, cpus[1].0, &over));
    }
    for (c, n) in out.delivered.iter().enumerate() {
        assert!(vm.store_guest_u32(link + MSI_LINK_EXPECTED + 4 * c as u64, *n));
    }
    assert!(vm.store_guest_u32(link + MSI_LINK_DONE, 1));
    out
}

/// Two NMIs by MSI to CPU 1 (APIC ID `apic_id`), back to back, once it has idled in its HLT
/// loop long enough to sleep: both reach it before its thread wakes, so a `user` vCPU hands
/// both to KVM at one entry, and KVM delivers the second only after the first one's IRET. The
/// NMIs CPU 1 counted within 2 s.
fn send_nmi_pair(vm: &RunningVm, link: u64, apic_id: u32, over: &dyn Fn() -> bool) -> u32 {
    let nmis = || vm.load_guest_u32(link + MSI_LINK_NMIS + 4).expect("in RAM");
    std::thread::sleep(Duration::from_millis(50));
    let address = MSI_BASE | u64::from(apic_id) << 12;
    for _ in 0..2 {
        let result = vm.signal_msi(address, MSI_NMI);
        assert!(
            matches!(result, Ok(irqvm::backend::MsiDelivery::Delivered)),
            "NMI by MSI: {result:?}"
        );
    }
    let t0 = Instant::now();
    while nmis() < 2 && t0.elapsed() < Duration::from_secs(2) && !over() {
        std::thread::sleep(Duration::from_millis(1));
    }
    // A third would show here if one were taken twice.
    std::thread::sleep(Duration::from_millis(20));
    nmis()
}

/// msi.c on 1 and 2 vCPUs in `mode`: every MSI the host sent was accepted by the API and taken
/// exactly once by the CPU it addressed (physical, logical, lowest priority among two), the
/// guest agrees with the host's per-CPU counts, malformed MSIs are refused with `InvalidMsi`,
/// an MSI to an absent APIC ID reports `NoTarget`, and neither delivers anything. With 2 vCPUs,
/// two NMIs sent by MSI at once to CPU 1 idling in HLT are both taken, once each
/// ([`send_nmi_pair`]; `user` mode took one before it stopped halting while KVM held the other).
pub fn check_msi_from_host(mode: IrqchipMode) {
    for cpus in [1, 2] {
        let _one = exclusive();
        let (run, msi) = run_msi_from_host(mode, cpus);
        let what = format!("msi from the host, {cpus} vCPU(s), {mode:?}");
        run.assert_expected("msi", mode, cpus);
        let expect_kinds = if cpus == 1 { 1 } else { 4 };
        assert_eq!(
            msi.kinds.len(),
            expect_kinds,
            "{what}: {msi:?}\n{}",
            run.output
        );
        for (name, right) in &msi.kinds {
            assert_eq!(
                *right, MSIS_PER_KIND,
                "{what}: {name}: {msi:?}\n{}",
                run.output
            );
        }
        let total: u32 = msi.delivered.iter().sum();
        assert_eq!(
            total,
            MSIS_PER_KIND * expect_kinds as u32,
            "{what}: {msi:?}"
        );
        assert_eq!(msi.malformed.len(), 4, "{what}");
        for answer in &msi.malformed {
            assert!(answer.starts_with("Err(InvalidMsi"), "{what}: {answer}");
        }
        assert_eq!(msi.no_target.as_deref(), Some("Ok(NoTarget)"), "{what}");
        assert!(
            msi.nothing_after_refused,
            "{what}: refused MSIs delivered\n{}",
            run.output
        );
        let pair = (cpus >= 2).then_some(2);
        assert_eq!(
            msi.nmi_pair, pair,
            "{what}: two NMIs at once to a halted cpu 1, each taken once\n{}",
            run.output
        );
        eprintln!("{what}: {msi:?}");
    }
}

/// protected_aps.c's `hold_link` (see the guest's header): word offsets.
const HOLD_ATTACHED: u64 = 0;
const HOLD_REQ_SEQ: u64 = 4;
const HOLD_REQ_CPU: u64 = 8;
const HOLD_ACK_SEQ: u64 = 12;
const HOLD_STATE: u64 = 16;
const HOLD_CONFIRMED: u64 = 20;

/// What the host thread of [`check_protected_aps`] read.
#[derive(Debug, Default)]
pub struct HoldReadback {
    /// Requests answered.
    pub answered: u32,
    /// Of those, answered with AP_RESET_HOLD.
    pub held: u32,
    /// Requests answered otherwise: (vCPU, state read).
    pub other: Vec<(u32, Option<irqchip::mpstate::MpState>)>,
}

/// The address in "READY: protected_aps link=0x..." once the guest printed the whole line.
fn wait_for_ready_link(
    capture: &SerialCapture,
    prefix: &str,
    over: &dyn Fn() -> bool,
) -> Option<u64> {
    loop {
        let text = capture.text();
        if let Some((line, _)) = text.split(prefix).nth(1).and_then(|r| r.split_once('\n')) {
            let hex: String = line.chars().take_while(char::is_ascii_hexdigit).collect();
            return Some(u64::from_str_radix(&hex, 16).expect("an address"));
        }
        if over() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The host half of protected_aps.c: for each request, read the vCPU's MP state through
/// `RunningVm::mp_state` (the KVM_GET_MP_STATE view) until it is AP_RESET_HOLD or 2 s pass, and
/// answer with its KVM value (`u32::MAX` if none could be read).
fn read_holds(vm: &RunningVm, capture: &SerialCapture) -> HoldReadback {
    use irqchip::mpstate::MpState;
    let start = Instant::now();
    let over = || start.elapsed() > VM_TIMEOUT || vm.vcpu(0).state() == VcpuState::Stopped;
    let mut out = HoldReadback::default();
    let Some(link) = wait_for_ready_link(capture, "READY: protected_aps link=0x", &over) else {
        return out;
    };
    let word = |offset| {
        vm.load_guest_u32(link + offset)
            .expect("hold_link is in RAM")
    };
    assert!(vm.store_guest_u32(link + HOLD_ATTACHED, 1));
    let mut answered_seq = 0;
    while !over() {
        let seq = word(HOLD_REQ_SEQ);
        if seq == answered_seq {
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        let cpu = word(HOLD_REQ_CPU);
        let t0 = Instant::now();
        let state = loop {
            let state = vm.mp_state(cpu as usize, Duration::from_secs(1));
            if state == Some(MpState::ApResetHold) || t0.elapsed() > Duration::from_secs(2) {
                break state;
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        out.answered += 1;
        if state == Some(MpState::ApResetHold) {
            out.held += 1;
        } else {
            out.other.push((cpu, state));
        }
        assert!(vm.store_guest_u32(link + HOLD_STATE, state.map_or(u32::MAX, MpState::to_kvm)));
        assert!(vm.store_guest_u32(link + HOLD_CONFIRMED, out.held));
        assert!(vm.store_guest_u32(link + HOLD_ACK_SEQ, seq));
        answered_seq = seq;
    }
    out
}

/// The config of protected_aps.c: `user` mode with `--protected-state-aps` (launch page 0x08,
/// where the guest library puts its AP trampoline).
pub fn protected_aps_config(cpus: u32) -> VmConfig {
    let mut cfg = guest_config("protected_aps", cpus, IrqchipMode::User);
    cfg.protected_state_aps = Some(irqvm::backend::ProtectedStateAps::default());
    cfg
}

/// protected_aps.c (seed 004) on every vCPU count its expectation file names, in `user` mode with
/// `--protected-state-aps`, beside the host thread that reads each parked AP's MP state: the run
/// prints what the file expects, and every parked AP the guest asked about read as AP_RESET_HOLD
/// (KVM_MP_STATE_AP_RESET_HOLD, 9) through `RunningVm::mp_state`.
pub fn check_protected_aps() {
    for cpus in expect::Expectations::load("protected_aps").cpu_counts() {
        let _one = exclusive();
        let (run, holds) = run_cfg_with_host_thread(protected_aps_config(cpus), read_holds);
        let holds = holds.unwrap_or_else(|_| panic!("the host thread panicked:\n{}", run.output));
        run.assert_expected("protected_aps", IrqchipMode::User, cpus);
        let what = format!("protected_aps, {cpus} vCPU(s)");
        assert!(holds.other.is_empty(), "{what}: {holds:?}\n{}", run.output);
        if cpus > 1 {
            assert!(holds.held > 0, "{what}: {holds:?}\n{}", run.output);
        }
        eprintln!("{what}: {holds:?}");
    }
}
