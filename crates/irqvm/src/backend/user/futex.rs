//! The futex under `user` mode's shared doorbells (`irqchip::wake`, issue 14): every vCPU of a
//! group of 32 sleeps on its group's word with FUTEX_WAIT_BITSET and its own bit, and a poster
//! wakes all the sleepers of a delivery in the group with one FUTEX_WAKE_BITSET. Through
//! rustix's safe wrappers (raw syscalls, no libc); seccomp's common rules allow `futex` on every
//! filtered thread (`crate::seccomp`), and every thread that posts (vCPUs, device and API
//! threads) may ring.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use irqchip::wake::SleepEnd;
use rustix::io::Errno;
use rustix::thread::futex;
use rustix::time::{clock_gettime, ClockId, Timespec};
use std::time::Instant;

/// FUTEX_WAKE's count: every waiter whose bitset matches (the kernel's count is an `int`, so
/// `u32::MAX` would read as -1 and wake one).
const WAKE_ALL: u32 = i32::MAX as u32;

/// FUTEX_WAIT_BITSET / FUTEX_WAKE_BITSET on a process-private word, counting the calls.
#[derive(Default)]
pub struct Futex {
    waits: AtomicU64,
    wakes: AtomicU64,
}

impl Futex {
    /// The calls so far, for the counters (`doorbell_waits`, `doorbell_wakes`).
    pub fn visit(&self, out: &mut dyn FnMut(&str, u64)) {
        out("doorbell_waits", self.waits.load(Ordering::Relaxed));
        out("doorbell_wakes", self.wakes.load(Ordering::Relaxed));
    }
}

impl irqchip::wake::WakeWord for Futex {
    /// Returns on a wake or at once when the word moved on (EAGAIN): the caller looks for its
    /// ring again. Ends the sleep on a signal (EINTR: the vCPU's kick, or its APIC timer's
    /// POSIX timer) and at `until` (ETIMEDOUT), which FUTEX_WAIT_BITSET takes as an absolute
    /// CLOCK_MONOTONIC time, the clock `Instant` reads on Linux.
    fn wait(&self, word: &AtomicU32, expected: u32, mask: u32, until: Option<Instant>) -> SleepEnd {
        let Some(mask) = NonZeroU32::new(mask) else {
            return SleepEnd::Interrupted;
        };
        let timeout = until.map(monotonic_at);
        self.waits.fetch_add(1, Ordering::Relaxed);
        match futex::wait_bitset(
            word,
            futex::Flags::PRIVATE,
            expected,
            timeout.as_ref(),
            mask,
        ) {
            Err(Errno::INTR | Errno::TIMEDOUT) => SleepEnd::Interrupted,
            _ => SleepEnd::Woken,
        }
    }

    /// Wakes every sleeper of `mask`. It cannot fail on a valid word with a non-zero mask.
    fn wake(&self, word: &AtomicU32, mask: u32) {
        let Some(mask) = NonZeroU32::new(mask) else {
            return;
        };
        self.wakes.fetch_add(1, Ordering::Relaxed);
        let _ = futex::wake_bitset(word, futex::Flags::PRIVATE, WAKE_ALL, mask);
    }
}

/// `at` as a CLOCK_MONOTONIC time: now on that clock plus what is left until `at` (zero if it
/// passed; far in the future if the sum would overflow, which no deadline reaches).
fn monotonic_at(at: Instant) -> Timespec {
    let now = clock_gettime(ClockId::Monotonic);
    Timespec::try_from(at.saturating_duration_since(Instant::now()))
        .ok()
        .and_then(|left| now.checked_add(left))
        .unwrap_or(Timespec {
            tv_sec: i64::MAX,
            tv_nsec: 0,
        })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use irqchip::wake::SharedDoorbells;
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    /// Three threads asleep on one word are all woken by one FUTEX_WAKE_BITSET.
    #[test]
    fn one_wake_call_wakes_three_sleeping_threads() {
        let bells = Arc::new(SharedDoorbells::new(4, Futex::default()));
        let sleepers = asleep_in_the_kernel(&bells, 1..4);
        let mut batch = bells.batch();
        for vcpu in 1..4 {
            batch.ring(vcpu);
        }
        drop(batch);
        for sleeper in sleepers {
            sleeper.join().unwrap();
        }
        assert_eq!(count(&bells, "doorbell_wakes"), 1);
    }

    /// The bitset keeps a wake to its own: a sleeper not rung stays asleep until its own ring.
    #[test]
    fn a_wake_reaches_only_the_bits_it_carries() {
        let bells = Arc::new(SharedDoorbells::new(2, Futex::default()));
        let sleepers = asleep_in_the_kernel(&bells, 0..2);
        bells.ring(0);
        let mut sleepers = sleepers.into_iter();
        sleepers.next().unwrap().join().unwrap();
        let other = sleepers.next().unwrap();
        // vCPU 1's wait may have returned spuriously and gone round (the word moved on), but it
        // is still in `wait`: only its own ring ends that.
        thread::sleep(Duration::from_millis(20));
        assert!(!other.is_finished(), "vCPU 1 woke without its ring");
        bells.ring(1);
        other.join().unwrap();
    }

    /// A sleep with a deadline ends there with no ring (the futex's absolute CLOCK_MONOTONIC
    /// timeout is `Instant`'s clock), and one whose deadline has passed returns at once; a
    /// ring still ends such a sleep before its deadline.
    #[test]
    fn a_sleep_with_a_deadline_ends_at_it_or_at_a_ring() {
        let bells = Arc::new(SharedDoorbells::new(1, Futex::default()));
        let start = std::time::Instant::now();
        let until = start + Duration::from_millis(20);
        bells.wait_until(0, Some(until));
        assert!(
            std::time::Instant::now() >= until,
            "woke before the deadline"
        );
        bells.wait_until(0, Some(start));
        let sleeper = {
            let bells = bells.clone();
            let far = std::time::Instant::now() + Duration::from_secs(3600);
            thread::spawn(move || bells.wait_until(0, Some(far)))
        };
        while waits(&bells) < 3 {
            thread::sleep(Duration::from_millis(1));
        }
        bells.ring(0);
        sleeper.join().unwrap();
    }

    /// A thread per vCPU of `vcpus` waiting on its doorbell, returned once each has made its
    /// futex wait (a ring before that is kept and costs no wake at all).
    pub(in crate::backend::user) fn asleep_in_the_kernel(
        bells: &Arc<SharedDoorbells<Futex>>,
        vcpus: std::ops::Range<usize>,
    ) -> Vec<thread::JoinHandle<()>> {
        let count = vcpus.len() as u64;
        let sleepers = vcpus
            .map(|vcpu| {
                let bells = bells.clone();
                thread::spawn(move || bells.wait(vcpu))
            })
            .collect();
        while waits(bells) < count {
            thread::sleep(Duration::from_millis(1));
        }
        sleepers
    }

    fn count(bells: &SharedDoorbells<Futex>, name: &str) -> u64 {
        let mut value = 0;
        bells.wake_word().visit(&mut |n, v| {
            if n == name {
                value = v;
            }
        });
        value
    }

    fn waits(bells: &SharedDoorbells<Futex>) -> u64 {
        count(bells, "doorbell_waits")
    }
}
