//! The vCPUs' multiprocessor states as the VMM reports them, in every irqchip mode: KVM's
//! (KVM_GET_MP_STATE) in kernel and split mode, the `irqchip` model's in user mode. Read at the
//! end of a run ([`RunReport::mp_states`]) and while the VM runs ([`RunningVm::mp_state`]).

mod common;

use std::time::{Duration, Instant};

use common::{debug_exit32, raw_config, run_guest, run_vm, HALT_FOREVER, VM_TIMEOUT};
use irqchip::mpstate::MpState;
use irqvm::loader::CpuMode;
use irqvm::vm::{RunReport, RunningVm, Vm};
use irqvm::IrqchipMode;

const MODES: [IrqchipMode; 3] = [IrqchipMode::Kernel, IrqchipMode::Split, IrqchipMode::User];

/// 32-bit code for the BSP: software-enable its xAPIC (SVR = 0x1FF), then send INIT (level
/// assert) to APIC ID 1 and no SIPI (SDM vol. 3 §11.6.1, ICR).
fn bsp_sends_init_to_ap1() -> Vec<u8> {
    let mut code = Vec::new();
    for (reg, value) in [(0xF0u32, 0x1FFu32), (0x310, 1 << 24), (0x300, 0x4500)] {
        code.extend_from_slice(&[0xC7, 0x05]); // mov dword [abs32], imm32
        code.extend_from_slice(&(0xFEE0_0000 + reg).to_le_bytes());
        code.extend_from_slice(&value.to_le_bytes());
    }
    code
}

fn report(result: &Result<RunReport, irqvm::vm::VmError>, output: &str) -> RunReport {
    result
        .as_ref()
        .unwrap_or_else(|e| panic!("{e}\n{output}"))
        .clone()
}

/// smp_boot starts every AP, which then idles in `sti; hlt`; the BSP ends the run with a port
/// write: BSP RUNNABLE, APs HALTED.
#[test]
fn after_smp_boot_the_bsp_is_runnable_and_the_aps_halted() {
    for mode in MODES {
        let run = run_guest("smp_boot", 4, mode);
        run.assert_expected("smp_boot", mode, 4);
        let states = report(&run.result, &run.output).mp_states;
        assert_eq!(
            states,
            [
                Some(MpState::Runnable),
                Some(MpState::Halted),
                Some(MpState::Halted),
                Some(MpState::Halted)
            ],
            "{mode:?}\n{}",
            run.output
        );
    }
}

/// hello never starts its AP: it is still waiting for INIT when the run ends (UNINITIALIZED).
#[test]
fn an_ap_nobody_started_is_uninitialized() {
    for mode in MODES {
        let run = run_guest("hello", 2, mode);
        run.assert_expected("hello", mode, 2);
        let states = report(&run.result, &run.output).mp_states;
        assert_eq!(
            states,
            [Some(MpState::Runnable), Some(MpState::Uninitialized)],
            "{mode:?}"
        );
    }
}

/// An AP that got INIT and no SIPI is in INIT_RECEIVED (wait-for-SIPI) at the end of the run,
/// even when the BSP ends the VM right after the ICR write: the report accepts pending events
/// first, as KVM_GET_MP_STATE does.
#[test]
fn an_ap_with_init_and_no_sipi_is_init_received() {
    for mode in MODES {
        let mut code = bsp_sends_init_to_ap1();
        code.extend(debug_exit32(0));
        let mut cfg = raw_config(&code, CpuMode::Protected32, 2);
        cfg.irqchip = mode;
        let run = run_vm(cfg);
        let states = report(&run.result, &run.output).mp_states;
        assert_eq!(
            states,
            [Some(MpState::Runnable), Some(MpState::InitReceived)],
            "{mode:?}"
        );
    }
}

/// Polls `vm.mp_state(index)` until it is `want` or the VM timeout passes; returns the last.
fn wait_for_mp_state(vm: &RunningVm, index: usize, want: MpState) -> Option<MpState> {
    let start = Instant::now();
    loop {
        let got = vm.mp_state(index, Duration::from_secs(5));
        if got == Some(want) || start.elapsed() > VM_TIMEOUT {
            return got;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// While the VM runs: the BSP sent INIT to AP 1 and halted with IF=0 (`cli; hlt`), so AP 1 is
/// INIT_RECEIVED and the BSP HALTED; asking (a ping) does not wake the BSP, and the report
/// after a host stop shows the same.
#[test]
fn a_running_vm_reports_halted_bsp_and_init_received_ap() {
    for mode in MODES {
        let mut code = bsp_sends_init_to_ap1();
        code.extend(HALT_FOREVER);
        let mut cfg = raw_config(&code, CpuMode::Protected32, 2);
        cfg.irqchip = mode;
        let vm = Vm::new(&cfg).unwrap().start().unwrap();
        let ap = wait_for_mp_state(&vm, 1, MpState::InitReceived);
        let bsp = wait_for_mp_state(&vm, 0, MpState::Halted);
        let again = vm.mp_state(0, Duration::from_secs(5));
        vm.stop();
        let report = vm.wait(Some(VM_TIMEOUT)).unwrap();
        assert_eq!(ap, Some(MpState::InitReceived), "{mode:?}: AP 1");
        assert_eq!(bsp, Some(MpState::Halted), "{mode:?}: BSP");
        assert_eq!(again, Some(MpState::Halted), "{mode:?}: BSP after a ping");
        assert_eq!(
            report.mp_states,
            [Some(MpState::Halted), Some(MpState::InitReceived)],
            "{mode:?}: report"
        );
    }
}
