//! The kick (seed 001): a real-time signal whose handler sets kvm_run.immediate_exit. Every kick
//! must be answered by a KVM_RUN return, wherever it lands relative to KVM_RUN; a lost kick
//! leaves the spinning vCPU inside KVM_RUN and the bounded wait fails.
//!
//! Timings printed here are for information only (the host is shared and noisy).

mod common;

use std::time::{Duration, Instant};

use common::*;
use irqvm::loader::CpuMode;
use irqvm::vcpu::{GuestExit, VcpuState};
use irqvm::vm::{RunningVm, Vm, VmError};

/// Bounds of the stress test: count and time.
const KICKS: u64 = 1000;
const PER_KICK_LIMIT: Duration = Duration::from_secs(5);
const TOTAL_LIMIT: Duration = Duration::from_secs(60);

fn start(code: &[u8], cpus: u32) -> RunningVm {
    let mut cfg = raw_config(code, CpuMode::Protected32, cpus);
    cfg.serial = irqvm::devices::SerialOutput::Discard;
    Vm::new(&cfg).unwrap().start().unwrap()
}

/// Waits until vCPU `index` has answered ping `n`; returns how long it took.
fn wait_answered(vm: &RunningVm, index: usize, n: u64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while vm.vcpu(index).pings_answered() < n {
        if start.elapsed() > limit {
            return None;
        }
        // Spin briefly (a kick is answered in ~10 us when both threads have a core), then
        // yield so a loaded host can run the vCPU thread.
        if start.elapsed() < Duration::from_micros(100) {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    Some(start.elapsed())
}

/// Waits until the vCPU has entered KVM_RUN at least once.
fn wait_running(vm: &RunningVm, index: usize) {
    let start = Instant::now();
    while vm.vcpu(index).stats.snapshot().kvm_runs == 0 {
        assert!(start.elapsed() < PER_KICK_LIMIT, "vCPU {index} never ran");
        std::thread::yield_now();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

#[test]
fn every_kick_of_a_spinning_vcpu_is_answered_by_a_kvm_run_return() {
    let vm = start(&SPIN, 1);
    wait_running(&vm, 0);
    let started = Instant::now();
    let mut latencies = Vec::new();
    for _ in 0..KICKS {
        assert!(
            started.elapsed() < TOTAL_LIMIT,
            "stress test over its time budget"
        );
        let n = vm.ping(0);
        let latency = wait_answered(&vm, 0, n, PER_KICK_LIMIT)
            .unwrap_or_else(|| panic!("kick {n} lost: the vCPU never left KVM_RUN"));
        latencies.push(latency);
    }
    let stats = vm.vcpu(0).stats.snapshot();
    assert_eq!(vm.vcpu(0).kick.kicks_sent(), KICKS);
    // The guest spins and makes no exits of its own: every return is a kick's.
    assert!(
        stats.eintr_returns >= KICKS,
        "{} EINTR returns for {KICKS} kicks",
        stats.eintr_returns
    );
    latencies.sort();
    eprintln!(
        "kick -> KVM_RUN return: median {:?}, p90 {:?}, p99 {:?}, max {:?} ({} kicks, {} KVM_RUNs)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.9),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        KICKS,
        stats.kvm_runs
    );
    vm.stop();
    let report = vm.wait(Some(PER_KICK_LIMIT)).unwrap();
    assert_eq!(report.exit, GuestExit::Stopped);
}

/// Kicks from several threads at once, without waiting for answers, then one last ping that
/// must still be answered: concurrent kicks neither wedge the vCPU nor get it stuck in guest
/// mode with a kick pending.
#[test]
fn concurrent_kickers_never_leave_a_kick_unanswered() {
    let vm = start(&SPIN, 1);
    wait_running(&vm, 0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| {
                for _ in 0..300 {
                    vm.ping(0);
                }
            });
        }
    });
    let n = vm.ping(0);
    assert!(
        wait_answered(&vm, 0, n, PER_KICK_LIMIT).is_some(),
        "final ping lost"
    );
    assert_eq!(vm.vcpu(0).kick.kicks_sent(), 901);
}

/// In kernel mode an AP without its SIPI waits inside KVM_RUN (KVM_MP_STATE_UNINITIALIZED);
/// kicks must still bring it out every time.
#[test]
fn kicks_reach_an_ap_waiting_for_sipi_inside_kvm_run() {
    let vm = start(&SPIN, 2);
    wait_running(&vm, 1);
    for _ in 0..200 {
        let n = vm.ping(1);
        assert!(
            wait_answered(&vm, 1, n, PER_KICK_LIMIT).is_some(),
            "kick {n} to the AP lost"
        );
    }
    assert_eq!(vm.vcpu(1).state(), VcpuState::Running);
}

/// A halted vCPU (cli; hlt) blocks inside KVM_RUN: its thread does not loop through KVM_RUN
/// while nothing happens.
#[test]
fn halted_vcpu_blocks_without_busy_looping() {
    let vm = start(&HALT_FOREVER, 1);
    wait_running(&vm, 0);
    std::thread::sleep(Duration::from_millis(300));
    let runs = vm.vcpu(0).stats.snapshot().kvm_runs;
    assert!(runs <= 2, "{runs} KVM_RUN calls while halted");
    // It still answers a kick, and goes back to sleep.
    let n = vm.ping(0);
    assert!(wait_answered(&vm, 0, n, PER_KICK_LIMIT).is_some());
}

/// Stopping a VM whose vCPUs all spin returns promptly and joins every thread.
#[test]
fn stop_ends_spinning_vcpus() {
    let vm = start(&SPIN, 4);
    for i in 0..4 {
        wait_running(&vm, i);
    }
    let t = Instant::now();
    vm.stop();
    let report = vm.wait(Some(PER_KICK_LIMIT)).unwrap();
    assert_eq!(report.exit, GuestExit::Stopped);
    eprintln!("stop of 4 spinning vCPUs took {:?}", t.elapsed());
}

/// A guest that never finishes is stopped at the timeout with a Timeout error.
#[test]
fn run_timeout_stops_a_hung_guest() {
    let cfg = raw_config(&HALT_FOREVER, CpuMode::Protected32, 2);
    let t = Instant::now();
    let result = Vm::new(&cfg).unwrap().run(Some(Duration::from_millis(300)));
    assert!(matches!(result, Err(VmError::Timeout(_))), "{result:?}");
    assert!(t.elapsed() < Duration::from_secs(10));
}
