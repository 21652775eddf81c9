//! The deadlines a VMM's timer thread holds for the vCPUs' APIC timers, and how a vCPU learns
//! that the thread fired its deadline, so that no timer wake-up is lost whatever the clocks do.
//!
//! A VMM that runs the local APICs in userspace sleeps a halted vCPU until something is posted to
//! it, and leaves its APIC timer to one thread that sleeps until the earliest deadline and then
//! posts a wake-up (`wake up` = the VMM's doorbell or kick). The deadlines are VM time
//! ([`Nanos`]). Two readings of VM time need not agree: the thread's sleep may end on a host clock
//! that runs a few parts per million apart from VM time, and the vCPU reads the clock at its own
//! moment. So the vCPU, woken for an expiry, may find its timer not yet due by its own reading.
//! It must then make sure that someone still holds the deadline, or it sleeps for good.
//!
//! # Protocol
//!
//! ```text
//! timer thread (under the table's lock)     vCPU, at each entry, after draining its wake-ups
//! for each slot with deadline <= now {      fired = take_fired()         // swap(false)
//!     slot = None                           if fired { armed = None }
//!     fired[i].store(true)                  poll the model's timer with its own `now`
//! }                                         next = the model's next deadline
//! (unlock) post a wake-up to each i         if next != armed { arm(next); armed = next }
//! ```
//!
//! `armed` is what the vCPU believes the thread holds for it. It is exact: the thread empties a
//! slot only by firing it, and a fire raises the flag before its wake-up is posted; an
//! [`DeadlineTable::arm`] lowers the flag together with the slot's write (under the lock). So
//! when the vCPU goes to sleep, either the thread holds `next` (and will fire it, then wake the
//! vCPU), or the fire came after the vCPU's drain, and its wake-up is still pending, so the sleep
//! does not begin (the doorbell's own protocol, `posting`, `wake`). If the fire's wake-up was
//! drained, the flag was raised before it, so `take_fired` sees it and the vCPU arms again, even
//! the same deadline. tests/loom_timer.rs checks this in every interleaving, and with
//! `--features broken-timer-rearm` (a vCPU that arms only a changed deadline) finds the vCPU
//! asleep with no deadline held and no wake-up pending.

use crate::sync::{AtomicBool, Ordering};
use crate::Nanos;

/// One deadline slot per vCPU, kept by the timer thread under the lock with which it sleeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeadlineTable {
    deadlines: Vec<Option<Nanos>>,
}

/// Per vCPU: the thread fired the slot since the vCPU last armed it. Read without the table's
/// lock by the vCPU's own thread ([`Self::take`]).
#[derive(Debug, Default)]
pub struct FiredFlags {
    fired: Vec<AtomicBool>,
}

impl FiredFlags {
    /// All lowered, for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            fired: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// True (once) if the thread fired vCPU `index`'s deadline since the vCPU last armed it.
    pub fn take(&self, index: usize) -> bool {
        // A load first: neighbouring vCPUs' flags share a cache line, this runs at every entry,
        // and a fire is rare.
        self.fired.get(index).is_some_and(|fired| {
            fired.load(Ordering::Acquire) && fired.swap(false, Ordering::AcqRel)
        })
    }

    fn set(&self, index: usize, value: bool) {
        if let Some(fired) = self.fired.get(index) {
            fired.store(value, Ordering::Release);
        }
    }
}

impl DeadlineTable {
    /// No deadline held, for `vcpus` vCPUs.
    pub fn new(vcpus: usize) -> Self {
        Self {
            deadlines: vec![None; vcpus],
        }
    }

    /// Sets (with `None` clears) vCPU `index`'s deadline, in VM time, and forgets an earlier
    /// fire of it. An index out of range changes nothing.
    pub fn arm(&mut self, index: usize, deadline: Option<Nanos>, fired: &FiredFlags) {
        if let Some(slot) = self.deadlines.get_mut(index) {
            *slot = deadline;
        }
        fired.set(index, false);
    }

    /// The thread at VM time `now`: empties every slot whose deadline `now` has reached, raising
    /// its fired flag, and appends its index to `expired`; the caller posts their wake-ups after
    /// this returns. Returns the earliest deadline still held.
    pub fn expire(
        &mut self,
        now: Nanos,
        fired: &FiredFlags,
        expired: &mut Vec<usize>,
    ) -> Option<Nanos> {
        for (index, slot) in self.deadlines.iter_mut().enumerate() {
            if slot.is_some_and(|d| d <= now) {
                *slot = None;
                fired.set(index, true);
                expired.push(index);
            }
        }
        self.deadlines.iter().flatten().min().copied()
    }

    /// vCPU `index`'s deadline as the thread holds it.
    pub fn held(&self, index: usize) -> Option<Nanos> {
        self.deadlines.get(index).copied().flatten()
    }
}

/// The vCPU's side: the deadline it believes the thread holds for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArmedDeadline {
    armed: Option<Nanos>,
}

impl ArmedDeadline {
    /// What the thread holds for this vCPU, as far as it knows.
    pub fn armed(&self) -> Option<Nanos> {
        self.armed
    }

    /// After the vCPU's drain and its poll of the model's timer: `next` is the model's next
    /// deadline. Calls `arm` (which must reach [`DeadlineTable::arm`]) when the thread does not
    /// hold `next`: it changed, or the thread fired it (`fired`) and holds none. Returns whether
    /// it armed.
    pub fn update(
        &mut self,
        fired: &FiredFlags,
        index: usize,
        next: Option<Nanos>,
        arm: impl FnOnce(Option<Nanos>),
    ) -> bool {
        if fired.take(index) && !cfg!(feature = "broken-timer-rearm") {
            self.armed = None;
        }
        if next == self.armed {
            return false;
        }
        self.armed = next;
        arm(next);
        true
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn a_fire_empties_the_slot_and_raises_the_flag_once() {
        let fired = FiredFlags::new(2);
        let mut table = DeadlineTable::new(2);
        table.arm(0, Some(100), &fired);
        table.arm(1, Some(300), &fired);
        let mut expired = Vec::new();
        assert_eq!(table.expire(99, &fired, &mut expired), Some(100));
        assert!(expired.is_empty(), "1 ns early");
        assert_eq!(table.expire(100, &fired, &mut expired), Some(300));
        assert_eq!(expired, [0]);
        assert_eq!(table.held(0), None);
        assert!(fired.take(0));
        assert!(!fired.take(0), "taken once");
        assert!(!fired.take(1));
    }

    #[test]
    fn an_arm_forgets_a_fire_and_out_of_range_indices_change_nothing() {
        let fired = FiredFlags::new(1);
        let mut table = DeadlineTable::new(1);
        table.arm(0, Some(5), &fired);
        table.expire(5, &fired, &mut Vec::new());
        table.arm(0, Some(9), &fired);
        assert!(!fired.take(0));
        assert_eq!(table.held(0), Some(9));
        table.arm(7, Some(1), &fired);
        assert!(!fired.take(7));
        assert_eq!(table, {
            let mut t = DeadlineTable::new(1);
            t.arm(0, Some(9), &fired);
            t
        });
    }

    /// The vCPU arms a changed deadline, not an unchanged one, and after a fire the same one
    /// again (its own reading of the clock may still be short of it).
    #[test]
    fn the_vcpu_arms_again_after_a_fire_even_the_same_deadline() {
        let fired = FiredFlags::new(1);
        let mut table = DeadlineTable::new(1);
        let mut armed = ArmedDeadline::default();
        assert!(armed.update(&fired, 0, Some(50), |d| table.arm(0, d, &fired)));
        assert!(!armed.update(&fired, 0, Some(50), |_| unreachable!()));
        table.expire(50, &fired, &mut Vec::new());
        assert!(armed.update(&fired, 0, Some(50), |d| table.arm(0, d, &fired)));
        assert_eq!(table.held(0), Some(50));
        assert_eq!(armed.armed(), Some(50));
        assert!(armed.update(&fired, 0, None, |d| table.arm(0, d, &fired)));
        assert_eq!(table.held(0), None);
    }
}
