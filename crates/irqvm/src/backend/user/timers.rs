//! The one timer facility of a `user`-mode VM: a single thread holding each vCPU's next APIC
//! timer deadline. When a deadline passes it posts a wake-up to that vCPU's inbox and kicks or
//! wakes it per the returned `Notify`; the vCPU itself then polls its APIC timer model with the VM
//! clock, which sets the vector in IRR. So an expiry reaches a vCPU running in the guest (kick), a
//! halted one (doorbell) and one between the two (it drains before entering).
//!
//! One slot per vCPU (the LAPIC has one timer), armed by the vCPU thread when its deadline
//! changes or after the thread fired it; a linear scan of the slots is cheaper than a heap at
//! these vCPU counts.
//!
//! Deadlines are VM time (`Nanos`), not host instants: the VM clock may count on the host TSC
//! (`super::VmClock`), which parts from CLOCK_MONOTONIC by parts per million, so a sleep on
//! CLOCK_MONOTONIC can end before VM time reaches the deadline. The thread therefore fires a slot
//! only when its own reading of the VM clock has reached the deadline; a sleep that ends early
//! re-reads the clock and sleeps for the rest.
//!
//! No lost wake-up, whatever the clocks do: the thread empties a slot only by firing it, and a
//! fire first raises that slot's `fired` flag, then posts the wake-up. The vCPU takes the flag
//! in `run_timer`, after the drain that begins its entry, and arms again whenever the model still
//! has a deadline the thread no longer holds, even the same one. The table, the flags and the
//! vCPU's rule are `irqchip::timer_slots` (its module documentation gives the argument;
//! tests/loom_timer.rs there checks it in every interleaving).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use irqchip::timer_slots::{DeadlineTable, FiredFlags};
use irqchip::Nanos;

use crate::seccomp::{Role, ThreadFilter};

/// The VM clock as the timer thread reads it (`super::VmClock`; a fake in tests).
pub trait VmTime: Send + 'static {
    fn now(&self) -> Nanos;
}

struct State {
    table: DeadlineTable,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Index = vCPU: the thread emptied the slot by firing it since the vCPU last armed it.
    /// Written under `state`'s lock; read without it by the vCPU ([`VmTimers::fired`]).
    fired: FiredFlags,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The VM's timer thread. Dropping it stops and joins the thread.
pub struct VmTimers {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the timer thread calls, off any lock, for a vCPU whose deadline passed.
pub type OnExpiry = Box<dyn Fn(usize) + Send>;

impl VmTimers {
    /// Starts the thread on `clock`, under its seccomp filter if `seccomp`.
    pub fn start(
        vcpus: usize,
        clock: impl VmTime,
        on_expiry: OnExpiry,
        seccomp: bool,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                table: DeadlineTable::new(vcpus),
                stop: false,
            }),
            changed: Condvar::new(),
            fired: FiredFlags::new(vcpus),
        });
        let filter = seccomp
            .then(|| ThreadFilter::new(Role::Timer))
            .transpose()
            .map_err(std::io::Error::other)?;
        let thread = {
            let shared = shared.clone();
            crate::seccomp::spawn("vm-timers".into(), filter, move || {
                run(&shared, &clock, on_expiry)
            })
            .map_err(std::io::Error::other)?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Sets (or with `None` clears) vCPU `index`'s deadline, in VM time.
    pub fn arm(&self, index: usize, deadline: Option<Nanos>) {
        let mut state = self.shared.lock();
        state.table.arm(index, deadline, &self.shared.fired);
        drop(state);
        self.shared.changed.notify_one();
    }

    /// The flags by which a vCPU learns that the thread fired its deadline (`take` them from
    /// that vCPU's thread only).
    pub fn fired(&self) -> &FiredFlags {
        &self.shared.fired
    }
}

fn run(shared: &Shared, clock: &dyn VmTime, on_expiry: OnExpiry) {
    // Linux delays a normal thread's timed sleeps by up to its timer slack (50 µs by default) to
    // batch wake-ups; an APIC timer wants its deadline, as KVM's hrtimers get it.
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let mut state = shared.lock();
    let mut expired = Vec::new();
    loop {
        if state.stop {
            return;
        }
        // VM time, read after every wake-up, early or not: a slot fires only once it is reached.
        let now = clock.now();
        let next = state.table.expire(now, &shared.fired, &mut expired);
        if !expired.is_empty() {
            // The flags are up (`expire`): the wake-ups go out after them, off the lock.
            drop(state);
            for index in expired.drain(..) {
                on_expiry(index);
            }
            state = shared.lock();
            continue;
        }
        state = match next {
            None => shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner),
            // The rest of the way in VM time, slept on CLOCK_MONOTONIC; an early end loops.
            Some(d) => {
                shared
                    .changed
                    .wait_timeout(state, Duration::from_nanos(d.saturating_sub(now)))
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
}

impl Drop for VmTimers {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;

    /// A VM clock the test sets by hand: it stands still while host time passes, so every sleep
    /// of the thread ends before VM time reaches the deadline it slept for.
    #[derive(Clone, Default)]
    struct HandClock(Arc<AtomicU64>);

    impl HandClock {
        fn set(&self, now: Nanos) {
            self.0.store(now, Ordering::SeqCst);
        }
    }

    impl VmTime for HandClock {
        fn now(&self) -> Nanos {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn start(clock: &HandClock) -> (VmTimers, mpsc::Receiver<usize>) {
        let (tx, rx) = mpsc::channel();
        let on_expiry = Box::new(move |i| {
            let _ = tx.send(i);
        });
        (
            VmTimers::start(2, clock.clone(), on_expiry, true).unwrap(),
            rx,
        )
    }

    /// Nothing arrives for a while (no fire the test could wait for).
    fn quiet(rx: &mpsc::Receiver<usize>) -> bool {
        rx.recv_timeout(Duration::from_millis(50)).is_err()
    }

    /// A deadline VM time has reached fires at once, once, and says so once through
    /// `fired().take`; a cleared one never fires.
    #[test]
    fn expired_deadline_fires_once_and_cleared_never() {
        let clock = HandClock::default();
        clock.set(1_000);
        let (timers, rx) = start(&clock);
        timers.arm(1, Some(3_600_000_000_000));
        timers.arm(1, None);
        timers.arm(0, Some(1_000));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(quiet(&rx));
        assert!(timers.fired().take(0));
        assert!(!timers.fired().take(0), "taken once");
        assert!(!timers.fired().take(1));
    }

    /// The lost wake-up of the first TSC clock: the host sleep for a deadline ends while VM time
    /// has not reached it. The thread must not fire then, nor drop the deadline: it fires, once,
    /// when VM time gets there. A deadline cleared meanwhile never fires.
    #[test]
    fn a_deadline_fires_when_vm_time_reaches_it_though_the_sleep_ends_before() {
        let clock = HandClock::default();
        let (timers, rx) = start(&clock);
        // 1 ms ahead: the thread's sleeps end many times over while the clock stands still.
        timers.arm(0, Some(1_000_000));
        timers.arm(1, Some(1_000_000));
        timers.arm(1, None);
        assert!(quiet(&rx), "fired before VM time reached the deadline");
        assert!(!timers.fired().take(0));
        clock.set(999_999);
        assert!(quiet(&rx), "fired 1 ns early");
        // Nothing tells the thread: it finds VM time there at the end of its own sleep.
        clock.set(5_000_000);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(quiet(&rx), "fired twice, or the cleared deadline fired");
        assert!(timers.fired().take(0));
        assert!(!timers.fired().take(1));
    }

    /// A vCPU that woke for a fired deadline and still sees it ahead arms it again (`run_timer`
    /// after `fired().take`): the same deadline fires again, and an arm forgets an earlier fire.
    #[test]
    fn a_fired_deadline_armed_again_fires_again() {
        let clock = HandClock::default();
        clock.set(10);
        let (timers, rx) = start(&clock);
        timers.arm(0, Some(10));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        timers.arm(0, Some(10));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(quiet(&rx));
        timers.arm(0, Some(1_000));
        assert!(!timers.fired().take(0), "the arm forgot the fire");
        clock.set(1_000);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(timers.fired().take(0));
    }
}
