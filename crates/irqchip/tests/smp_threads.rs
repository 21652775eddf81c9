//! The whole per-vCPU protocol on real threads: INIT-SIPI-SIPI start-up, IPIs between vCPUs,
//! halting and waking, with one host thread per vCPU and more vCPUs than host cores. Every
//! assertion is a count of guest-visible events (starts, interrupts taken), never a timing.
#![cfg(not(feature = "loom"))]

#[path = "../examples/smp_demo/sim.rs"]
mod sim;

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// Runs the simulation on its own thread so that a hang fails the test instead of CI.
fn run_guarded(vcpus: usize, rounds: u64) -> sim::Report {
    let (done, report) = mpsc::channel();
    thread::spawn(move || done.send(sim::run(vcpus, rounds, false)));
    report
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| {
            panic!("{vcpus} vCPUs x {rounds} rounds did not finish: a lost IPI or wake-up")
        })
}

fn check(vcpus: usize, rounds: u64) {
    let report = run_guarded(vcpus, rounds);
    // SDM vol. 3 §9.4.4: INIT-SIPI-SIPI starts each AP exactly once (the second SIPI finds it
    // running and is dropped); the BSP never takes a SIPI.
    assert_eq!(report.starts[0], 0, "BSP started by a SIPI");
    assert!(
        report.starts[1..].iter().all(|&n| n == 1),
        "AP starts {:?}",
        report.starts
    );
    let mut online = report.online_order.clone();
    online.sort_unstable();
    assert_eq!(online, (1..vcpus).collect::<Vec<_>>());
    // Every AP's hello reached the BSP (each its own vector, so none coalesce).
    assert_eq!(report.hellos as usize, vcpus - 1);
    // The token went around `rounds` times and once more into the BSP to stop: each vCPU took
    // it exactly `rounds` times, the BSP one more (its initial send counts as one).
    assert_eq!(report.tokens[0], rounds + 1, "BSP tokens");
    assert!(
        report.tokens[1..].iter().all(|&n| n == rounds),
        "AP tokens {:?}",
        report.tokens
    );
    assert!(
        report.log.iter().all(|line| !line.contains("unexpected")),
        "{:?}",
        report.log
    );
}

#[test]
fn one_vcpu_passes_the_token_to_itself() {
    check(1, 20);
}

#[test]
fn two_vcpus_ping_pong() {
    check(2, 200);
}

#[test]
fn four_vcpus_ring() {
    check(4, 100);
}

#[test]
fn sixteen_vcpus_on_two_cores() {
    check(16, 20);
}

#[test]
fn repeated_start_ups_never_lose_an_init_or_sipi() {
    for _ in 0..20 {
        check(8, 1);
    }
}
