//! Loom model check of the shared doorbells (`irqchip::wake`, issue 14): vCPUs of one group
//! sleep on one shared word with a bit each, and a poster wakes every sleeper it rang in a
//! delivery with one wake. Every interleaving, and every outcome the C++11 memory model allows
//! for the orderings used:
//!
//!     cargo test -p irqchip --release --features loom --test loom_wake
//!     cargo test -p irqchip --release --features loom,broken-shared-bell --test loom_wake
//!
//! The second run builds a waiter that reads the group's word after announcing its sleep
//! instead of before, and expects loom to find the lost wake-up.
//!
//! The futex is modelled by [`ModelFutex`]: the compare of the word and the queueing happen
//! under the lock that `wake` takes, as the kernel's hash-bucket lock orders them (futex(2):
//! "the loading of the futex word's value, the comparison of that value with the expected value,
//! and the actual blocking will happen atomically and will be totally ordered with respect to
//! concurrent operations performed by other threads on the same futex word"). A lost wake-up is
//! a thread queued on the word, its bit never woken, after every ring of the model is done: it
//! would sleep forever. The model reports it as a panic (rather than leaving loom to find the
//! deadlock, which aborts the process), then wakes the thread so that the execution can end.
#![cfg(feature = "loom")]

use irqchip::posting::{Posted, VcpuInbox};
use irqchip::sync::{Arc, AtomicBool, AtomicU32, Ordering};

mod loom_support;
use irqchip::wake::{SharedBell, SharedDoorbells, SleepEnd, WakeWord};
use irqchip::{InterruptSink, Notify, TriggerMode, Vector};
use loom::sync::{Condvar, Mutex};
use loom::thread;
use loom_support::check;
use std::time::Instant;

const VECTOR: Vector = 0x41;

/// Bounds that keep each model at a few seconds; LOOM_MAX_PREEMPTIONS overrides them.
const BOUND: Option<usize> = Some(3);

/// The futex stand-in: who sleeps with which mask, and how many waits and wakes were made.
/// A wait with a deadline also ends when the model's clock passes it ([`ModelFutex::time_out`]),
/// and once it has, such a wait returns at once (its `until` is in the past).
#[derive(Default)]
struct ModelFutex {
    queue: Mutex<Queue>,
    woken: Condvar,
}

#[derive(Default)]
struct Queue {
    /// One entry per wait that went to sleep: its mask, whether it has a deadline, and how it
    /// ended (`None` while asleep).
    sleepers: Vec<(u32, bool, Option<SleepEnd>)>,
    wakes: usize,
    /// The deadlines of every wait have passed.
    timed_out: bool,
}

impl WakeWord for ModelFutex {
    fn wait(&self, word: &AtomicU32, expected: u32, mask: u32, until: Option<Instant>) -> SleepEnd {
        let mut queue = self.queue.lock().unwrap();
        if until.is_some() && queue.timed_out {
            return SleepEnd::Interrupted; // ETIMEDOUT at once
        }
        if word.load(Ordering::Relaxed) != expected {
            return SleepEnd::Woken; // EAGAIN
        }
        let slot = queue.sleepers.len();
        queue.sleepers.push((mask, until.is_some(), None));
        loop {
            if let Some(end) = queue.sleepers[slot].2 {
                return end;
            }
            queue = self.woken.wait(queue).unwrap();
        }
    }

    fn wake(&self, _word: &AtomicU32, mask: u32) {
        let mut queue = self.queue.lock().unwrap();
        queue.wakes += 1;
        for sleeper in queue.sleepers.iter_mut() {
            if sleeper.0 & mask != 0 && sleeper.2.is_none() {
                sleeper.2 = Some(SleepEnd::Woken);
            }
        }
        drop(queue);
        self.woken.notify_all();
    }
}

impl ModelFutex {
    /// True when a thread with a bit of `mask` is asleep and no wake reached it.
    fn asleep_unwoken(&self, mask: u32) -> bool {
        let queue = self.queue.lock().unwrap();
        queue
            .sleepers
            .iter()
            .any(|&(m, _, end)| m & mask != 0 && end.is_none())
    }

    fn wakes(&self) -> usize {
        self.queue.lock().unwrap().wakes
    }

    /// The clock passes every deadline: sleeps that have one end, and later waits with one
    /// return at once.
    fn time_out(&self) {
        let mut queue = self.queue.lock().unwrap();
        queue.timed_out = true;
        for sleeper in queue.sleepers.iter_mut() {
            if sleeper.1 && sleeper.2.is_none() {
                sleeper.2 = Some(SleepEnd::Interrupted);
            }
        }
        drop(queue);
        self.woken.notify_all();
    }

    /// Wakes every sleeper (after a lost wake-up was recorded, so that the execution ends).
    fn release_all(&self) {
        self.wake(&AtomicU32::new(0), u32::MAX);
    }
}

type Bells = SharedDoorbells<ModelFutex>;

/// A halted vCPU's thread: its inbox (on a shared bell) and whether its halt has returned.
struct Vcpu {
    inbox: VcpuInbox,
    done: AtomicBool,
}

fn vcpus(bells: &Arc<Bells>, count: usize) -> Vec<Arc<Vcpu>> {
    (0..count)
        .map(|index| {
            let bell = SharedBell::new(Arc::clone(bells), index);
            Arc::new(Vcpu {
                inbox: VcpuInbox::with_bell(Box::new(bell)),
                done: AtomicBool::new(false),
            })
        })
        .collect()
}

/// The vCPU halts: blocks unless work is pending, then drains (the VMM's `block`).
fn halt(vcpu: &Vcpu) -> Posted {
    if vcpu.inbox.try_block() {
        vcpu.inbox.block_until_rung();
    }
    let posted = vcpu.inbox.drain();
    vcpu.done.store(true, Ordering::Release);
    posted
}

fn spawn_halt(vcpu: &Arc<Vcpu>) -> thread::JoinHandle<Posted> {
    let vcpu = Arc::clone(vcpu);
    thread::spawn(move || halt(&vcpu))
}

/// After every ring: waits until the vCPU's halt returned or it sleeps on the word, and fails
/// if it sleeps with no wake on its way (then wakes it, so that the execution can end).
fn assert_not_stranded(bells: &Bells, vcpu: &Vcpu, index: usize) {
    let bit = 1u32 << index;
    while !vcpu.done.load(Ordering::Acquire) && !bells.wake_word().asleep_unwoken(bit) {
        thread::yield_now();
    }
    if !vcpu.done.load(Ordering::Acquire) {
        bells.wake_word().release_all();
        panic!("lost wake-up: vCPU {index} sleeps after every ring was made");
    }
}

/// What the VMM's notifier does for one delivery: posts to every target, latches the rings of
/// those that must be woken, and wakes them together at the end.
fn broadcast(bells: &Bells, targets: &[(usize, &Arc<Vcpu>)]) {
    let mut batch = bells.batch();
    for &(index, vcpu) in targets {
        match vcpu.inbox.post_vector(VECTOR, TriggerMode::Edge) {
            Notify::Wake => {
                batch.ring(index);
            }
            Notify::None => {}
            Notify::Kick => panic!("a halted vCPU is never in guest mode"),
        }
    }
    batch.flush();
}

/// A poster sends one IPI to two halted vCPUs of a group: both are woken (or never slept) and
/// drain it, with at most one wake for the two.
fn broadcast_to_two_halted_vcpus() {
    check(BOUND, || {
        let bells = Arc::new(SharedDoorbells::new(2, ModelFutex::default()));
        let cpus = vcpus(&bells, 2);
        let halts: Vec<_> = cpus.iter().map(spawn_halt).collect();
        broadcast(&bells, &[(0, &cpus[0]), (1, &cpus[1])]);
        for (index, vcpu) in cpus.iter().enumerate() {
            assert_not_stranded(&bells, vcpu, index);
        }
        for halt in halts {
            assert!(
                halt.join().unwrap().contains(VECTOR),
                "woken without the IPI"
            );
        }
        assert!(bells.wake_word().wakes() <= 1, "one wake per group");
    });
}

/// One target (an IPI to one vCPU): woken or never asleep, with at most one wake, and none at
/// all when the post found it awake (the unicast path costs what the mutex doorbell cost).
fn unicast_to_a_halting_vcpu() {
    check(None, || {
        let bells = Arc::new(SharedDoorbells::new(1, ModelFutex::default()));
        let cpus = vcpus(&bells, 1);
        let halt = spawn_halt(&cpus[0]);
        let mut batch = bells.batch();
        let how = cpus[0].inbox.post_vector(VECTOR, TriggerMode::Edge);
        if how == Notify::Wake {
            batch.ring(0);
        }
        drop(batch);
        assert_not_stranded(&bells, &cpus[0], 0);
        assert!(halt.join().unwrap().contains(VECTOR));
        let wakes = bells.wake_word().wakes();
        assert!(wakes <= 1, "{wakes} wakes for one ring");
        if how != Notify::Wake {
            assert_eq!(wakes, 0, "a wake for a vCPU that was not blocked");
        }
    });
}

/// Two posters ring two vCPUs of one group separately: each wake moves the shared word on,
/// which the other vCPU's wait may see (its wait returns and it goes round). Neither sleeps
/// through its own ring.
fn separate_rings_in_one_group() {
    check(BOUND, || {
        let bells = Arc::new(SharedDoorbells::new(2, ModelFutex::default()));
        let sleepers: Vec<_> = (0..2)
            .map(|index| {
                let bells = Arc::clone(&bells);
                thread::spawn(move || bells.wait(index))
            })
            .collect();
        let other = {
            let bells = Arc::clone(&bells);
            thread::spawn(move || bells.ring(1))
        };
        bells.ring(0);
        other.join().unwrap();
        for sleeper in sleepers {
            sleeper.join().unwrap();
        }
    });
}

/// A halted vCPU whose own timer deadline is near sleeps until then (`VcpuInterrupts::
/// block_until`) while a poster sends it an IPI and the clock passes the deadline, in any
/// order. The timer's end of the sleep consumes a ring that came meanwhile, so the vCPU must
/// find the IPI in the drain that follows, or in a second halt (with no deadline left), and
/// never sleep through the ring.
fn a_sleep_ended_by_the_timer_keeps_the_post() {
    check(BOUND, || {
        let bells = Arc::new(SharedDoorbells::new(1, ModelFutex::default()));
        let cpus = vcpus(&bells, 1);
        let halts = {
            let vcpu = Arc::clone(&cpus[0]);
            thread::spawn(move || {
                let mut until = Some(Instant::now());
                loop {
                    if vcpu.inbox.try_block() {
                        vcpu.inbox.block_until_rung_or(until.take());
                    }
                    if vcpu.inbox.drain().contains(VECTOR) {
                        break;
                    }
                }
                vcpu.done.store(true, Ordering::Release);
            })
        };
        let timer = {
            let bells = Arc::clone(&bells);
            thread::spawn(move || bells.wake_word().time_out())
        };
        let mut batch = bells.batch();
        if cpus[0].inbox.post_vector(VECTOR, TriggerMode::Edge) == Notify::Wake {
            batch.ring(0);
        }
        drop(batch);
        timer.join().unwrap();
        assert_not_stranded(&bells, &cpus[0], 0);
        halts.join().unwrap();
    });
}

#[cfg(not(feature = "broken-shared-bell"))]
mod correct {
    use super::*;

    #[test]
    fn a_broadcast_wakes_every_halted_target_with_one_wake() {
        broadcast_to_two_halted_vcpus();
    }

    #[test]
    fn a_unicast_wakes_only_a_sleeper_and_at_most_once() {
        unicast_to_a_halting_vcpu();
    }

    #[test]
    fn rings_of_two_vcpus_of_a_group_both_arrive() {
        separate_rings_in_one_group();
    }
    #[test]
    fn a_post_during_a_sleep_the_timer_ends_is_kept() {
        a_sleep_ended_by_the_timer_keeps_the_post();
    }
}

/// With `broken-shared-bell` the model must FAIL: the proof that the order of the waiter's
/// load and its announcement matters.
#[cfg(feature = "broken-shared-bell")]
mod broken {
    use super::*;

    #[test]
    #[should_panic(expected = "lost wake-up")]
    fn loom_finds_the_wake_up_lost_when_the_word_is_read_after_the_announcement() {
        unicast_to_a_halting_vcpu();
    }
}
