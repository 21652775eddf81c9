//! Doorbells that share one kernel wait word per 32 vCPUs, so that one syscall wakes every
//! sleeper a broadcast targets (issue 14).
//!
//! With a [`Doorbell`](crate::posting::Doorbell) per vCPU (a mutex and a condvar), an IPI to N
//! halted vCPUs costs N futex wakes in a row, and on a host with fewer cores than vCPU threads
//! the sender loses its core to the first vCPUs it woke before it has woken the others
//! (docs/benchmarks.md §6: the third target of a 4-vCPU broadcast was posted and woken a median
//! 172 µs after the first). Here the vCPUs of a group of 32 sleep on one shared word, each with
//! a bitset of its own (Linux's FUTEX_WAIT_BITSET), and a poster wakes every sleeper it rang in
//! a group with one FUTEX_WAKE_BITSET carrying their bits: the rings of a delivery are latched
//! as the bus posts ([`WakeBatch::ring`]) and the wakes go out together when it is done
//! ([`WakeBatch::flush`]). This crate makes no syscall: the sleep and the wake are a
//! [`WakeWord`], which the VMM implements with the futex syscall and the loom model with a
//! stand-in (tests/loom_wake.rs).
//!
//! # Protocol
//!
//! Per vCPU a state byte, `RUNG` (a ring not yet consumed) and `SLEEPING` (the waiter sleeps or
//! is about to); per group a sequence number, which is the word the group sleeps on.
//!
//! ```text
//! waiter (the vCPU's own thread)            ringer (any thread)
//! loop {                                    old = state.fetch_or(RUNG)
//!     s = seq.load()                        if old & (RUNG | SLEEPING) == SLEEPING {
//!     old = state.fetch_or(SLEEPING)            // this ring owns the wake (batched per group)
//!     if old & RUNG { state.swap(0); return }   seq.fetch_add(1)
//!     wait(seq, s, my bit)                      wake(seq, bits of the group's rung sleepers)
//! }                                         }
//! ```
//!
//! No ring is lost. The two RMWs of one vCPU's state byte are totally ordered (its
//! modification order). If the ringer's comes first, the waiter's `fetch_or` reads `RUNG` and
//! returns without sleeping. If the waiter's comes first, the ringer reads `SLEEPING`, so this
//! ring or an earlier one (the one that set `RUNG`, which then read `SLEEPING` too) owns a wake.
//! That ringer's RMW read the waiter's (`AcqRel`), so the waiter's load of the sequence
//! happens-before the ringer's increment and cannot have read it (coherence): the waiter waits
//! for a value the word no longer holds once the increment is done. The kernel compares the
//! word and queues the waiter atomically with respect to wakes of that word (futex(2)): either
//! the compare comes after the increment (the wait returns at once, the loop finds `RUNG`), or
//! the waiter is queued before the increment and hence before the wake, which its bit reaches.
//! The sequence is what makes the sleep conditional: the state byte cannot be the futex word,
//! since 32 vCPUs share the word. A wrap of the 32-bit sequence between a waiter's load and its
//! compare would need 2^32 wakes in those few microseconds.
//!
//! Syscalls: a ring of a vCPU that is not asleep (running, polling, or already rung) makes
//! none; a ring of a sleeper makes one wake, shared with every other sleeper of its group rung
//! in the same batch. A waiter makes one wait per sleep, plus one per wake of another vCPU of
//! its group that lands between its load of the sequence and its compare (the wait returns at
//! once and the loop goes round).

use crate::posting::Bell;
use crate::sync::{Arc, AtomicU32, AtomicU8, Ordering};
use crate::types::VcpuIndex;
use std::time::Instant;

/// vCPUs per shared word: a futex bitset is 32 bits wide.
pub const GROUP_SIZE: usize = 32;

/// A ring not yet consumed by a `wait`.
const RUNG: u8 = 1 << 0;
/// The waiter sleeps, or is between announcing it and the kernel's compare.
const SLEEPING: u8 = 1 << 1;

/// The kernel primitive shared doorbells sleep and wake on: on Linux FUTEX_WAIT_BITSET and
/// FUTEX_WAKE_BITSET of a private futex.
pub trait WakeWord: Send + Sync {
    /// Sleeps while `word` holds `expected`, until a [`Self::wake`] of `word` whose mask shares
    /// a bit with `mask`, or until `until` if given. The load, the compare and the sleep must
    /// be atomic with respect to `wake` (futex(2)). May return early for any reason (a changed
    /// word, a wake meant for another bit): the caller re-checks. Returns
    /// [`SleepEnd::Interrupted`] when the sleep ended without a wake and should not be taken up
    /// again: `until` passed, or a signal arrived (the sleeper's own thread has something to
    /// do; on Linux the vCPU's kick and its APIC timer are signals).
    fn wait(&self, word: &AtomicU32, expected: u32, mask: u32, until: Option<Instant>) -> SleepEnd;
    /// Wakes every thread sleeping on `word` whose mask shares a bit with `mask`.
    fn wake(&self, word: &AtomicU32, mask: u32);
}

/// How a [`WakeWord::wait`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepEnd {
    /// A wake, a changed word, or a spurious return: the waiter looks for its ring again.
    Woken,
    /// Its time passed or a signal arrived: the waiter returns to its caller, rung or not.
    Interrupted,
}

/// The doorbells of every vCPU of a VM, grouped by 32 on shared words (module doc).
pub struct SharedDoorbells<W> {
    /// Per group of [`GROUP_SIZE`] vCPUs: the word its sleepers wait on.
    sequences: Box<[AtomicU32]>,
    /// Per vCPU: `RUNG` | `SLEEPING`.
    states: Box<[AtomicU8]>,
    word: W,
}

impl<W: WakeWord> SharedDoorbells<W> {
    /// Doorbells for `vcpus` vCPUs, none rung, sleeping and waking through `word`.
    pub fn new(vcpus: usize, word: W) -> Self {
        Self {
            sequences: (0..vcpus.div_ceil(GROUP_SIZE))
                .map(|_| AtomicU32::new(0))
                .collect(),
            states: (0..vcpus).map(|_| AtomicU8::new(0)).collect(),
            word,
        }
    }

    /// How many vCPUs have a doorbell here.
    pub fn vcpus(&self) -> usize {
        self.states.len()
    }

    /// The wait/wake primitive (the VMM's, for its counters).
    pub fn wake_word(&self) -> &W {
        &self.word
    }

    /// A batch of rings whose wakes go out together when it is flushed or dropped.
    pub fn batch(&self) -> WakeBatch<'_, W> {
        WakeBatch {
            bells: self,
            group: 0,
            mask: 0,
        }
    }

    /// Rings `vcpu`'s doorbell alone (a batch of one). An index past the VM's vCPUs rings
    /// nothing.
    pub fn ring(&self, vcpu: VcpuIndex) {
        self.batch().ring(vcpu);
    }

    /// Sleeps on `vcpu`'s doorbell until it is rung (at once if it was rung since the last
    /// `wait`), then clears it; a signal to the sleeping thread ends the sleep too
    /// ([`SleepEnd::Interrupted`]), and the caller re-checks. Only `vcpu`'s own thread may call
    /// it. An index past the VM's vCPUs returns at once.
    pub fn wait(&self, vcpu: VcpuIndex) {
        self.wait_until(vcpu, None);
    }

    /// [`Self::wait`], ending also at `until` or at a signal ([`SleepEnd::Interrupted`]): then
    /// the doorbell is cleared as by a ring's return, so that a ring that came meanwhile makes
    /// no futex call and the caller's re-check after the return sees what it rang for.
    pub fn wait_until(&self, vcpu: VcpuIndex, until: Option<Instant>) {
        let (Some(state), Some(sequence)) =
            (self.states.get(vcpu), self.sequences.get(vcpu / GROUP_SIZE))
        else {
            return;
        };
        loop {
            // The load comes before the RMW that announces the sleep (module doc). The
            // test-only broken variant loads after it, which the loom model must catch.
            #[cfg(not(feature = "broken-shared-bell"))]
            let expected = sequence.load(Ordering::Acquire);
            let announced = state.fetch_or(SLEEPING, Ordering::AcqRel);
            #[cfg(feature = "broken-shared-bell")]
            let expected = sequence.load(Ordering::Acquire);
            if announced & RUNG != 0 {
                state.swap(0, Ordering::AcqRel);
                return;
            }
            if self.word.wait(sequence, expected, bit_of(vcpu), until) == SleepEnd::Interrupted {
                // Not asleep any more: a ring from now on makes no wake call. A ring latched
                // since the announcement is consumed here; its post was published before it
                // (AcqRel), so the caller's drain after this return finds it.
                state.swap(0, Ordering::AcqRel);
                return;
            }
        }
    }

    /// Latches a ring on `vcpu`. True when this ring owns waking it: it sleeps (or is about
    /// to) and no earlier ring since its last wake owns that already.
    fn latch(&self, vcpu: VcpuIndex) -> bool {
        self.states.get(vcpu).is_some_and(|state| {
            state.fetch_or(RUNG, Ordering::AcqRel) & (RUNG | SLEEPING) == SLEEPING
        })
    }

    /// Wakes the sleepers `mask` of `group`, after moving the group's word on so that a waiter
    /// not yet queued does not sleep (module doc).
    fn wake_group(&self, group: usize, mask: u32) {
        if let Some(sequence) = self.sequences.get(group) {
            sequence.fetch_add(1, Ordering::AcqRel);
            self.word.wake(sequence, mask);
        }
    }
}

/// `vcpu`'s bit in its group's wait and wake masks.
fn bit_of(vcpu: VcpuIndex) -> u32 {
    1 << (vcpu % GROUP_SIZE)
}

/// Rings collected during one delivery: each ring is latched at once, and the vCPUs it found
/// asleep are woken with one [`WakeWord::wake`] per group when the batch is flushed (or
/// dropped). Rings in index order (the bus posts its targets sorted) make one wake per group;
/// a ring of another group flushes the wakes collected so far.
pub struct WakeBatch<'a, W: WakeWord> {
    bells: &'a SharedDoorbells<W>,
    group: usize,
    /// Sleepers of `group` rung since the last flush.
    mask: u32,
}

impl<W: WakeWord> WakeBatch<'_, W> {
    /// Rings `vcpu`'s doorbell; its wake, if it needs one, goes out with the batch's. True when
    /// this ring found `vcpu` asleep and owns its wake (false: it was running, polling, or
    /// already rung).
    pub fn ring(&mut self, vcpu: VcpuIndex) -> bool {
        if !self.bells.latch(vcpu) {
            return false;
        }
        let group = vcpu / GROUP_SIZE;
        if group != self.group {
            self.flush();
            self.group = group;
        }
        self.mask |= bit_of(vcpu);
        true
    }

    /// Wakes the sleepers rung so far (one wake, or none if no ring found a sleeper).
    pub fn flush(&mut self) {
        if self.mask != 0 {
            self.bells.wake_group(self.group, self.mask);
            self.mask = 0;
        }
    }
}

impl<W: WakeWord> Drop for WakeBatch<'_, W> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// One vCPU's doorbell among [`SharedDoorbells`], for its [`crate::posting::VcpuInbox`].
pub struct SharedBell<W> {
    bells: Arc<SharedDoorbells<W>>,
    vcpu: VcpuIndex,
}

impl<W: WakeWord> SharedBell<W> {
    /// The doorbell of `vcpu` in `bells`.
    pub fn new(bells: Arc<SharedDoorbells<W>>, vcpu: VcpuIndex) -> Self {
        Self { bells, vcpu }
    }
}

impl<W: WakeWord> Bell for SharedBell<W> {
    fn ring(&self) {
        self.bells.ring(self.vcpu);
    }

    fn wait(&self, until: Option<Instant>) {
        self.bells.wait_until(self.vcpu, until);
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::sync::{Condvar, Mutex};
    use std::thread;

    /// A futex stand-in with std primitives: the compare and the queueing happen under the
    /// lock `wake` takes, as the kernel's hash-bucket lock orders them. Counts the calls.
    #[derive(Default)]
    struct FakeFutex {
        queue: Mutex<Queue>,
        woken: Condvar,
    }

    #[derive(Default)]
    struct Queue {
        /// Per thread that slept: its mask (0 once it left) and whether a wake reached it.
        sleepers: Vec<(u32, bool)>,
        waits: usize,
        wakes: Vec<u32>,
    }

    impl WakeWord for FakeFutex {
        fn wait(
            &self,
            word: &AtomicU32,
            expected: u32,
            mask: u32,
            until: Option<Instant>,
        ) -> SleepEnd {
            let mut queue = self.queue.lock().unwrap();
            queue.waits += 1;
            if word.load(Ordering::SeqCst) != expected {
                return SleepEnd::Woken;
            }
            let slot = queue.sleepers.len();
            queue.sleepers.push((mask, false));
            let mut end = SleepEnd::Woken;
            while !queue.sleepers[slot].1 {
                let Some(until) = until else {
                    queue = self.woken.wait(queue).unwrap();
                    continue;
                };
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    end = SleepEnd::Interrupted;
                    break;
                }
                queue = self.woken.wait_timeout(queue, left).unwrap().0;
            }
            queue.sleepers[slot].0 = 0;
            end
        }

        fn wake(&self, _word: &AtomicU32, mask: u32) {
            let mut queue = self.queue.lock().unwrap();
            queue.wakes.push(mask);
            for sleeper in &mut queue.sleepers {
                if sleeper.0 & mask != 0 {
                    sleeper.1 = true;
                }
            }
            self.woken.notify_all();
        }
    }

    impl FakeFutex {
        fn wakes(&self) -> Vec<u32> {
            self.queue.lock().unwrap().wakes.clone()
        }
        fn waits(&self) -> usize {
            self.queue.lock().unwrap().waits
        }
    }

    fn bells(vcpus: usize) -> std::sync::Arc<SharedDoorbells<FakeFutex>> {
        std::sync::Arc::new(SharedDoorbells::new(vcpus, FakeFutex::default()))
    }

    #[test]
    fn a_ring_before_the_wait_is_kept_and_costs_no_syscall() {
        let bells = bells(3);
        bells.ring(1);
        bells.ring(1);
        bells.wait(1);
        assert!(bells.wake_word().wakes().is_empty(), "nobody slept");
        assert_eq!(bells.wake_word().waits(), 0, "the wait found the ring");
        assert_eq!(bells.states[1].load(Ordering::SeqCst), 0, "consumed");
    }

    #[test]
    fn groups_of_32_share_a_word_with_a_bit_each() {
        let bells = bells(70);
        assert_eq!(bells.sequences.len(), 3);
        assert_eq!(bit_of(0), 1);
        assert_eq!(bit_of(33), 2);
        assert_eq!(bit_of(69), 1 << 5);
    }

    /// Marks `vcpus` as asleep, as a waiter does before its futex wait.
    fn asleep(bells: &SharedDoorbells<FakeFutex>, vcpus: &[usize]) {
        for &v in vcpus {
            bells.states[v].fetch_or(SLEEPING, Ordering::SeqCst);
        }
    }

    #[test]
    fn one_wake_per_group_for_the_sleepers_of_a_batch() {
        let bells = bells(70);
        asleep(&bells, &[1, 2, 3, 40, 41]);
        let mut batch = bells.batch();
        let found_asleep: Vec<bool> = [0, 1, 2, 3, 5, 40, 41, 69]
            .into_iter()
            .map(|v| batch.ring(v))
            .collect();
        drop(batch);
        assert_eq!(
            found_asleep,
            [false, true, true, true, false, true, true, false],
            "a ring owns a wake exactly where its vCPU sleeps"
        );
        assert_eq!(
            bells.wake_word().wakes(),
            vec![0b1110, 0b11 << 8],
            "vCPUs 1-3 in one wake, 40-41 in another; 0, 5 and 69 were awake"
        );
        assert_eq!(bells.sequences[0].load(Ordering::SeqCst), 1);
        assert_eq!(bells.sequences[1].load(Ordering::SeqCst), 1);
        assert_eq!(bells.sequences[2].load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_second_ring_before_the_wake_adds_no_wake() {
        let bells = bells(2);
        asleep(&bells, &[1]);
        let mut batch = bells.batch();
        assert!(batch.ring(1), "the first ring owns the wake");
        assert!(!batch.ring(1), "the second finds it rung");
        drop(batch);
        assert_eq!(bells.wake_word().wakes(), vec![0b10]);
    }

    /// A sleep that ends at its deadline leaves the doorbell clear and not asleep: a ring
    /// after it makes no wake call and is kept for the next wait.
    #[test]
    fn a_sleep_that_times_out_leaves_no_sleeper_for_a_ring_to_wake() {
        let bells = bells(2);
        let until = Instant::now() + std::time::Duration::from_millis(5);
        bells.wait_until(1, Some(until));
        assert!(Instant::now() >= until, "returned before its deadline");
        assert_eq!(bells.states[1].load(Ordering::SeqCst), 0);
        assert!(
            !bells.batch().ring(1),
            "a ring after the sleep finds nobody asleep"
        );
        assert!(bells.wake_word().wakes().is_empty());
        let waits = bells.wake_word().waits();
        bells.wait_until(1, Some(until));
        assert_eq!(
            bells.wake_word().waits(),
            waits,
            "the kept ring ends the next wait at once"
        );
    }

    /// A deadline already past when the sleep begins ends it at once, with no lost ring: this
    /// is the sleep of a vCPU whose timer signal came just before its futex call.
    #[test]
    fn a_deadline_already_past_ends_the_sleep_at_once() {
        let bells = bells(1);
        bells.wait_until(0, Some(Instant::now()));
        assert_eq!(bells.states[0].load(Ordering::SeqCst), 0);
        assert_eq!(
            bells.wake_word().waits(),
            1,
            "one wait, which found its time gone"
        );
    }

    #[test]
    fn out_of_range_indexes_do_nothing() {
        let bells = bells(2);
        bells.ring(2);
        bells.ring(usize::MAX);
        bells.wait(5);
        assert!(bells.wake_word().wakes().is_empty());
    }

    #[test]
    fn a_batch_wakes_every_sleeping_thread_it_rang() {
        for _ in 0..100 {
            let bells = bells(4);
            let waiters: Vec<_> = (1..4)
                .map(|v| {
                    let bells = bells.clone();
                    thread::spawn(move || bells.wait(v))
                })
                .collect();
            let mut batch = bells.batch();
            for v in 1..4 {
                batch.ring(v);
            }
            batch.flush();
            for waiter in waiters {
                waiter.join().unwrap();
            }
            assert!(bells.wake_word().wakes().len() <= 1, "one wake at most");
        }
    }

    #[test]
    fn the_bell_of_an_inbox_rings_and_waits_through_the_shared_word() {
        let bells = bells(2);
        let bell = SharedBell::new(bells.clone(), 1);
        Bell::ring(&bell);
        Bell::wait(&bell, None);
        let waiter = {
            let bells = bells.clone();
            thread::spawn(move || SharedBell::new(bells, 1).wait(None))
        };
        while bells.states[1].load(Ordering::SeqCst) & SLEEPING == 0 {
            thread::yield_now();
        }
        bell.ring();
        waiter.join().unwrap();
    }
}
