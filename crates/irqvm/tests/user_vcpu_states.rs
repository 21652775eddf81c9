//! The `user` backend's vCPU states on real KVM vCPUs: an AP without its SIPI never enters
//! KVM_RUN and sleeps on its doorbell; a vCPU halted with IF=0 and nothing pending sleeps too;
//! both wake for a ping (doorbell) and go back to sleep; a spinning vCPU answers every kick.

mod common;

use std::time::{Duration, Instant};

use common::*;
use irqvm::loader::CpuMode;
use irqvm::vcpu::{GuestExit, VcpuState};
use irqvm::vm::{RunningVm, Vm};
use irqvm::IrqchipMode;

const LIMIT: Duration = Duration::from_secs(5);

fn start(code: &[u8], cpus: u32) -> RunningVm {
    let mut cfg = raw_config(code, CpuMode::Protected32, cpus);
    cfg.irqchip = IrqchipMode::User;
    cfg.serial = irqvm::devices::SerialOutput::Discard;
    Vm::new(&cfg).unwrap().start().unwrap()
}

fn wait_state(vm: &RunningVm, index: usize, state: VcpuState) {
    let start = Instant::now();
    while vm.vcpu(index).state() != state {
        assert!(
            start.elapsed() < LIMIT,
            "vCPU {index} never reached {state:?}"
        );
        std::thread::yield_now();
    }
}

fn wait_answered(vm: &RunningVm, index: usize, n: u64) -> bool {
    let start = Instant::now();
    while vm.vcpu(index).pings_answered() < n {
        if start.elapsed() > LIMIT {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

#[test]
fn ap_waits_for_sipi_outside_kvm_run_and_answers_pings() {
    let vm = start(&SPIN, 2);
    wait_state(&vm, 1, VcpuState::WaitingForSipi);
    for _ in 0..100 {
        let n = vm.ping(1);
        assert!(wait_answered(&vm, 1, n), "ping {n} to the AP lost");
    }
    let stats = vm.vcpu(1).stats.snapshot();
    assert_eq!(stats.kvm_runs, 0, "an AP entered KVM_RUN before its SIPI");
    assert!(stats.blocks >= 1);
    vm.stop();
    assert_eq!(vm.wait(Some(LIMIT)).unwrap().exit, GuestExit::Stopped);
}

#[test]
fn vcpu_halted_with_if_clear_sleeps_without_busy_looping() {
    let vm = start(&HALT_FOREVER, 1);
    wait_state(&vm, 0, VcpuState::Halted);
    let before = vm.vcpu(0).stats.snapshot();
    std::thread::sleep(Duration::from_millis(200));
    let after = vm.vcpu(0).stats.snapshot();
    assert!(
        after.kvm_runs - before.kvm_runs <= 1 && after.blocks - before.blocks <= 2,
        "{before:?} -> {after:?}"
    );
    let n = vm.ping(0);
    assert!(wait_answered(&vm, 0, n));
    vm.stop();
    assert_eq!(vm.wait(Some(LIMIT)).unwrap().exit, GuestExit::Stopped);
}

#[test]
fn every_kick_of_a_spinning_vcpu_is_answered() {
    let vm = start(&SPIN, 1);
    wait_state(&vm, 0, VcpuState::Running);
    for _ in 0..300 {
        let n = vm.ping(0);
        assert!(wait_answered(&vm, 0, n), "kick {n} lost");
    }
    vm.stop();
    assert_eq!(vm.wait(Some(LIMIT)).unwrap().exit, GuestExit::Stopped);
}
