//! When a guest leaves its vCPU unusable, the VM stops with a report that names the vCPU, the
//! exit, the guest RIP and the register state (docs/architecture.md, "When the guest
//! misbehaves"), in every irqchip mode.

#[macro_use]
mod common;

use irqvm::loader::CpuMode;
use irqvm::vcpu::report::LastExit;
use irqvm::vcpu::VcpuError;
use irqvm::vm::VmError;
use irqvm::IrqchipMode;

/// Where `raw_config` loads and enters the code.
const ENTRY: u64 = 0x10_0000;

/// `mov rbx, 0x1122334455667788; clac` in 64-bit mode: kvm_pvm cannot emulate CLAC
/// (docs/kvm-facts.md) and irqvm's `emulate` does not finish it (it finishes only `int3`,
/// `int n` and `fwait`), so KVM_RUN ends with KVM_EXIT_INTERNAL_ERROR and the VM stops.
fn int3_guest(mode: IrqchipMode) {
    let mut code = vec![0x48, 0xBB];
    code.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    code.extend_from_slice(&[0x0F, 0x01, 0xCA]);
    let mut cfg = common::raw_config(&code, CpuMode::Long64, 1);
    cfg.irqchip = mode;
    let _one = common::exclusive();
    let run = common::run_vm(cfg);
    let failure = match run.result {
        Err(VmError::Vcpu(failure)) => failure,
        other => panic!(
            "{mode:?}: expected a vCPU failure, got {:?}",
            other.map(|r| r.exit)
        ),
    };
    assert_eq!(failure.vcpu, 0);
    let VcpuError::Internal {
        rip,
        ref instruction,
        ..
    } = *failure.error
    else {
        panic!("{mode:?}: not an internal error: {}", failure.error);
    };
    eprintln!("{mode:?}: {}", failure.report());
    // When KVM gives the instruction bytes, they are the CLAC's.
    if let Some(bytes) = instruction {
        assert_eq!(
            bytes.get(..3),
            Some(&[0x0F, 0x01, 0xCA][..]),
            "instruction bytes {bytes:02x?}"
        );
    }
    // KVM reports the RIP of the instruction it could not run (the CLAC at ENTRY + 10).
    assert_eq!(rip, ENTRY + 10, "rip {rip:#x}");
    assert_eq!(failure.exit, LastExit::InternalError);
    let state = failure.state.as_ref().expect("registers captured");
    assert_eq!(state.gprs[1], 0x1122_3344_5566_7788, "rbx");
    assert!(state.cs.long, "64-bit code segment: {}", state.cs);
    let report = failure.report();
    for needle in [
        "vCPU 0 failed",
        "last exit: KVM internal error",
        "rbx 0x1122334455667788",
        "efer",
    ] {
        assert!(report.contains(needle), "{needle} missing in:\n{report}");
    }
}

#[test]
fn an_emulation_failure_is_reported_with_registers_in_user_mode() {
    int3_guest(IrqchipMode::User);
}

#[test]
fn an_emulation_failure_is_reported_with_registers_in_split_mode() {
    int3_guest(IrqchipMode::Split);
}

#[test]
fn an_emulation_failure_is_reported_with_registers_in_kernel_mode() {
    int3_guest(IrqchipMode::Kernel);
}
