//! Shared helpers of the integration tests: run a VM on a helper thread with a hard timeout,
//! build tiny raw / ELF64 / a.out guests from machine code.
#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

use irqvm::devices::{SerialCapture, SerialOutput};
use irqvm::irqchip::IrqchipMode;
use irqvm::loader::{CpuMode, RawImage};
use irqvm::vm::{RunReport, Vm, VmConfig, VmError};

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
