//! Loom model check of the timer thread's deadlines and the vCPU's re-arm after a fire
//! (`irqchip::timer_slots`): a vCPU woken for its APIC timer whose own reading of VM time is
//! still short of the deadline must not go to sleep with nobody holding that deadline.
//!
//!     cargo test -p irqchip --release --features loom --test loom_timer
//!     cargo test -p irqchip --release --features loom,broken-timer-rearm --test loom_timer
//!
//! The second run builds a vCPU that arms only a changed deadline (the rule before session 19)
//! and expects loom to find it asleep with no deadline held and no wake-up pending.
//!
//! The wake-up is modelled as a flag under a mutex that the thread raises after its fire and the
//! vCPU's drain clears (the doorbell's own protocol is loom-checked in tests/loom_wake.rs and
//! tests/loom_posting.rs; with a plain atomic here, loom 0.7 reported a store followed by a load
//! of the same flag on one thread reading the value of another thread's earlier swap, which C11
//! coherence rules out: loom's known mis-ordering of a store against a concurrent RMW,
//! tokio-rs/loom issues 254 and 389). The table is under a mutex, as the VMM keeps it under the
//! lock its thread sleeps with. At the end of every execution the vCPU would sleep; it is stranded if no
//! wake-up is pending and the thread holds no deadline for it.
#![cfg(feature = "loom")]

use irqchip::sync::Arc;
use irqchip::timer_slots::{ArmedDeadline, DeadlineTable, FiredFlags};
use irqchip::Nanos;
use loom::sync::Mutex;
use loom::thread;

mod loom_support;
use loom_support::check;

/// The deadline both threads work with.
const DEADLINE: Nanos = 1_000;

struct Timers {
    table: Mutex<DeadlineTable>,
    fired: FiredFlags,
    /// A wake-up posted to vCPU 0 and not yet drained.
    wake_pending: Mutex<bool>,
}

impl Timers {
    fn new() -> Self {
        Self {
            table: Mutex::new(DeadlineTable::new(1)),
            fired: FiredFlags::new(1),
            wake_pending: Mutex::new(false),
        }
    }

    fn arm(&self, deadline: Option<Nanos>) {
        self.table.lock().unwrap().arm(0, deadline, &self.fired);
    }

    /// One pass of the timer thread at VM time `now`: the fires under the lock, their wake-ups
    /// after it.
    fn thread_pass(&self, now: Nanos) {
        let mut expired = Vec::new();
        self.table
            .lock()
            .unwrap()
            .expire(now, &self.fired, &mut expired);
        for _ in expired {
            *self.wake_pending.lock().unwrap() = true;
        }
    }

    /// One entry of the vCPU: drain, then keep the thread's deadline in step with the model's
    /// `next` (its own clock reading left the timer not yet due).
    fn vcpu_entry(&self, armed: &mut ArmedDeadline, next: Option<Nanos>) {
        *self.wake_pending.lock().unwrap() = false;
        armed.update(&self.fired, 0, next, |d| self.arm(d));
    }

    fn assert_not_stranded(&self) {
        let held = self.table.lock().unwrap().held(0);
        let pending = *self.wake_pending.lock().unwrap();
        assert!(
            held.is_some() || pending,
            "lost timer wake-up: the vCPU sleeps, no wake-up pending, the thread holds no deadline"
        );
    }
}

/// The vCPU armed `DEADLINE`; the thread reaches it in one pass while the vCPU runs one entry per
/// element of `nexts` (the model's next deadline at that entry, its clock reading short of it).
/// In every interleaving the vCPU ends with a wake-up pending or a deadline held, and a later
/// deadline it moved to is held.
fn entries_beside_a_fire(nexts: &'static [Nanos]) {
    check(None, move || {
        let timers = Arc::new(Timers::new());
        let mut armed = ArmedDeadline::default();
        armed.update(&timers.fired, 0, Some(DEADLINE), |d| timers.arm(d));
        let thread = {
            let timers = Arc::clone(&timers);
            thread::spawn(move || timers.thread_pass(DEADLINE))
        };
        for &next in nexts {
            timers.vcpu_entry(&mut armed, Some(next));
        }
        thread.join().unwrap();
        timers.assert_not_stranded();
        if let Some(&last) = nexts.last().filter(|&&last| last != DEADLINE) {
            // A later deadline is never fired by a pass at `DEADLINE`: it must be held.
            assert_eq!(timers.table.lock().unwrap().held(0), Some(last));
        }
    });
}

/// The thread reaches the deadline while the vCPU, whose clock reading is short of it, runs an
/// entry.
fn one_entry_beside_a_fire() {
    entries_beside_a_fire(&[DEADLINE]);
}

#[cfg(not(feature = "broken-timer-rearm"))]
mod correct {
    use super::*;

    #[test]
    fn a_fire_the_vcpu_finds_not_yet_due_is_armed_again() {
        one_entry_beside_a_fire();
    }

    /// Two entries around one fire (the second after a wake-up the first may have drained).
    #[test]
    fn two_entries_around_a_fire_are_never_stranded() {
        entries_beside_a_fire(&[DEADLINE, DEADLINE]);
    }

    /// The vCPU moves its deadline later while the thread fires the old one.
    #[test]
    fn a_deadline_moved_during_a_fire_is_held() {
        entries_beside_a_fire(&[2 * DEADLINE]);
    }
}

/// With `broken-timer-rearm` the model must FAIL: the proof that the re-arm after a fire
/// matters.
#[cfg(feature = "broken-timer-rearm")]
mod broken {
    use super::*;

    #[test]
    #[should_panic(expected = "lost timer wake-up")]
    fn loom_finds_the_wake_up_lost_without_the_re_arm() {
        one_entry_beside_a_fire();
    }
}
