//! Shared helpers of the integration tests: run a VM on a helper thread with a hard timeout,
//! build tiny raw / ELF64 / a.out guests from machine code.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::{Duration, Instant};

use irqvm::devices::{SerialCapture, SerialOutput};
use irqvm::irqchip::IrqchipMode;
use irqvm::loader::{CpuMode, RawImage};
use irqvm::vcpu::VcpuState;
use irqvm::vm::{RunReport, RunningVm, Vm, VmConfig, VmError};

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
    /// Like [`Self::assert_all_passed`], except that checks tagged `[tag]` (a host limit the
    /// guest names, see kvm-facts.md) may fail: the run must have at least one such failure or
    /// none, no other failure, and a DONE line. Returns the tolerated failures.
    pub fn assert_passed_except(&self, what: &str, tag: &str) -> Vec<String> {
        if let Err(e) = &self.result {
            panic!("{what}: {e}\n--- output ---\n{}", self.output);
        }
        let marker = format!("[{tag}]");
        let fails: Vec<String> = self
            .output
            .lines()
            .filter(|l| l.starts_with("FAIL"))
            .map(str::to_string)
            .collect();
        let untagged: Vec<&String> = fails.iter().filter(|l| !l.contains(&marker)).collect();
        assert!(
            untagged.is_empty(),
            "{what}: failures not explained by {marker}: {untagged:?}\n{}",
            self.output
        );
        assert!(
            self.output.contains("DONE: "),
            "{what}: no DONE line:\n{}",
            self.output
        );
        fails
    }

    /// Asserts the guest library's protocol: a DONE line, no FAIL line, debug-exit 0 (status 1).
    pub fn assert_all_passed(&self, what: &str) {
        let report = self
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{what}: {e}\n--- output ---\n{}", self.output));
        assert!(
            !self.output.contains("FAIL"),
            "{what} failed:\n{}",
            self.output
        );
        assert!(
            self.output.contains("DONE: "),
            "{what}: no DONE line:\n{}",
            self.output
        );
        assert_eq!(
            report.exit.exit_status(),
            1,
            "{what}: exit status (debug-exit 0 gives 1):\n{}",
            self.output
        );
    }
}

/// Runs `cfg` with serial captured, under both timeouts.
pub fn run_vm(mut cfg: VmConfig) -> GuestRun {
    let capture = SerialCapture::new();
    cfg.serial = SerialOutput::Capture(capture.clone());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let result = Vm::new(&cfg).and_then(|vm| vm.run(Some(VM_TIMEOUT)));
        let _ = tx.send(result);
    });
    let result = rx
        .recv_timeout(HARNESS_TIMEOUT)
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

/// Runs guest `name` on `cpus` vCPUs in `mode`.
pub fn run_guest(name: &str, cpus: u32, mode: IrqchipMode) -> GuestRun {
    let path = guest_path(name);
    let kernel = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut cfg = VmConfig::new(kernel, &format!("{name}.elf"));
    cfg.cpus = cpus;
    cfg.irqchip = mode;
    run_vm(cfg)
}

/// A VM config for raw machine code loaded and entered at 1 MiB.
pub fn raw_config(code: &[u8], mode: CpuMode, cpus: u32) -> VmConfig {
    let mut cfg = VmConfig::new(code.to_vec(), "raw");
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
/// the guest closed the window. Returns the run and how many times the host pulsed.
pub fn run_storm_with_host_line(mode: IrqchipMode, cpus: u32) -> (GuestRun, u32) {
    let capture = SerialCapture::new();
    let kernel = std::fs::read(guest_path("storm")).unwrap();
    let mut cfg = VmConfig::new(kernel, "storm.elf");
    cfg.cpus = cpus;
    cfg.irqchip = mode;
    cfg.serial = SerialOutput::Capture(capture.clone());
    let (tx, rx) = mpsc::channel();
    {
        let capture = capture.clone();
        std::thread::spawn(move || {
            let vm = Vm::new(&cfg).unwrap().start().unwrap();
            let pulses =
                std::thread::scope(|s| s.spawn(|| pulse_host_line(&vm, &capture)).join().unwrap());
            let _ = tx.send((vm.wait(Some(VM_TIMEOUT)), pulses));
        });
    }
    let (result, pulses) = rx.recv_timeout(HARNESS_TIMEOUT).expect("VM did not stop");
    let run = GuestRun {
        result,
        output: capture.text(),
    };
    (run, pulses)
}

/// The guest's `host_link` words: the guest writes `stop` and counts `dev10`, the host writes
/// `busy`.
const LINK_STOP: u64 = 0;
const LINK_BUSY: u64 = 4;
const LINK_DEV10: u64 = 8;
/// The line the host drives (the guest pulses line 11 itself).
const HOST_LINE: u32 = 10;

/// The host half of storm.c's handshake: `busy` = 1, then read `stop` (the guest writes `stop`,
/// then reads `busy`: one side always sees the other), pulse, wait until the guest counted it,
/// `busy` = 0. Bounded by the VM's end.
fn pulse_host_line(vm: &RunningVm, capture: &SerialCapture) -> u32 {
    let start = Instant::now();
    let over = || start.elapsed() > VM_TIMEOUT || vm.vcpu(0).state() == VcpuState::Stopped;
    let Some(link) = wait_for_host_link(capture, &over) else {
        return 0;
    };
    let word = |offset| {
        vm.load_guest_u32(link + offset)
            .expect("host_link is in RAM")
    };
    let mut pulses = 0;
    loop {
        assert!(
            vm.store_guest_u32(link + LINK_BUSY, 1),
            "{link:#x} is not in RAM"
        );
        if word(LINK_STOP) != 0 || over() {
            vm.store_guest_u32(link + LINK_BUSY, 0);
            return pulses;
        }
        let counted = word(LINK_DEV10);
        vm.irqchip().pulse_line(HOST_LINE).unwrap();
        pulses += 1;
        while word(LINK_DEV10) == counted && !over() {
            std::thread::sleep(Duration::from_micros(50));
        }
        vm.store_guest_u32(link + LINK_BUSY, 0);
        std::thread::sleep(Duration::from_micros(300));
    }
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
/// 20 pulses of line 11 gave 20 interrupts, and the host's `pulses` of line 10 gave exactly
/// `pulses` interrupts.
pub fn assert_storm_counts_exact(run: &GuestRun, cpus: u32, pulses: u32, what: &str) {
    run.assert_all_passed(what);
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
    eprintln!("{what}: {pulses} host pulses; {line}");
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

/// Runs guest `name` on 1, 2 and 4 vCPUs in `mode`, one VM at a time. With `host_limit`, checks
/// the guest tags `[host_limit]` may fail (see [`GuestRun::assert_passed_except`]); without,
/// every check must pass.
pub fn run_on_1_2_4(name: &str, mode: IrqchipMode, host_limit: Option<&str>) -> Vec<GuestRun> {
    [1, 2, 4]
        .into_iter()
        .map(|cpus| {
            let _one = exclusive();
            let run = run_guest(name, cpus, mode);
            let what = format!("{name} on {cpus} vCPU(s), {mode:?} irqchip");
            match host_limit {
                Some(tag) => {
                    run.assert_passed_except(&what, tag);
                }
                None => run.assert_all_passed(&what),
            }
            run
        })
        .collect()
}

/// The checks of `init_state` that must PASS (not SKIP) on this host in every mode.
pub const INIT_STATE_CHECKS: &[&str] = &[
    "PASS: init clears the general registers",
    "PASS: init loads edx with the cpuid signature",
    "PASS: init loads eflags 2",
    "PASS: init cr0 is et with cd and nw kept [tcg-init-cr0]",
    "PASS: init clears cr2 cr3 cr4",
    "PASS: init clears efer",
    "PASS: init and sipi load the selectors",
    "PASS: init clears the fs and gs bases",
    "PASS: init loads gdtr and idtr base 0 limit ffff",
    "PASS: init loads the debug registers",
    "PASS: init clears tr and ldtr",
    "PASS: init keeps ia32_sysenter_cs",
    "PASS: init keeps ia32_star",
    "PASS: init keeps ia32_lstar",
    "PASS: init keeps ia32_kernel_gs_base",
    "PASS: init keeps ia32_pat",
    "PASS: init keeps the tsc running",
    "PASS: init keeps the x87 control word",
    "PASS: init keeps mxcsr",
    "PASS: init keeps xmm0",
    "PASS: init disables the kvm clock msr",
];

/// SDM Table 10-1 from inside the guest, on 2 and 4 vCPUs: after INIT-SIPI the AP finds every
/// register INIT resets at its reset value and everything INIT keeps as it left it. With
/// `host_limit`, checks tagged with it may fail (KVM doing the INIT here leaves RDMSR of the
/// FS/GS bases stale: `[kvm-init-fsgs-msr]`); `extra` lists checks that must pass too.
pub fn check_init_state(mode: IrqchipMode, host_limit: Option<&str>, extra: &[&str]) {
    for cpus in [2, 4] {
        let _one = exclusive();
        let run = run_guest("init_state", cpus, mode);
        let what = format!("init_state on {cpus} vCPUs, {mode:?} irqchip");
        match host_limit {
            Some(tag) => {
                run.assert_passed_except(&what, tag);
            }
            None => run.assert_all_passed(&what),
        }
        for line in INIT_STATE_CHECKS.iter().chain(extra) {
            assert!(
                run.output.contains(line),
                "{what}: no {line:?}:\n{}",
                run.output
            );
        }
    }
}

/// The storm guest on 2 and 4 vCPUs while a host thread pulses IOAPIC line 10 (storm.c's
/// `host_link` handshake: one host edge outstanding at a time, none after the guest closed the
/// window): every IPI sent is received exactly once, and the guest counts exactly the device
/// interrupts raised, the host's pulses of line 10 and its own 20 of line 11.
pub fn check_storm_with_host_line(mode: IrqchipMode) {
    for cpus in [2, 4] {
        let _one = exclusive();
        let (run, pulses) = run_storm_with_host_line(mode, cpus);
        assert_storm_counts_exact(
            &run,
            cpus,
            pulses,
            &format!("storm, host line, {cpus} vCPUs, {mode:?}"),
        );
    }
}
