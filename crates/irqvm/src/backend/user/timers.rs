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
//! (`take_fired`) in `run_timer`, after the drain that begins its entry, and arms again whenever
//! the model still has a deadline the thread no longer holds. So when a vCPU goes to sleep,
//! either the thread holds its deadline (and will fire and wake it), or a fire came after that
//! drain and its wake-up is still posted, so the sleep does not begin. This holds even if the
//! vCPU's reading of the VM clock is below the deadline when it wakes (it then re-arms the same
//! deadline); before, such a wake-up left the deadline with nobody to fire it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use irqchip::Nanos;

use crate::seccomp::{Role, ThreadFilter};

/// The VM clock as the timer thread reads it (`super::VmClock`; a fake in tests).
pub trait VmTime: Send + 'static {
    fn now(&self) -> Nanos;
}

struct State {
    deadlines: Vec<Option<Nanos>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Index = vCPU: the thread emptied the slot by firing it since the vCPU last armed it.
    /// Written under `state`'s lock; read without it by the vCPU ([`VmTimers::take_fired`]).
    fired: Vec<AtomicBool>,
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
                deadlines: vec![None; vcpus],
                stop: false,
            }),
            changed: Condvar::new(),
            fired: (0..vcpus).map(|_| AtomicBool::new(false)).collect(),
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
        if let Some(slot) = state.deadlines.get_mut(index) {
            *slot = deadline;
        }
        if let Some(fired) = self.shared.fired.get(index) {
            fired.store(false, Ordering::Relaxed);
        }
        drop(state);
        self.shared.changed.notify_one();
    }

    /// True (once) if the thread fired vCPU `index`'s deadline since the vCPU last armed it: the
    /// thread holds no deadline for it now. Called by that vCPU's thread only.
    pub fn take_fired(&self, index: usize) -> bool {
        // A load first: the flags of neighbouring vCPUs share a cache line, and this runs at
        // every entry while a fire is rare.
        self.shared.fired.get(index).is_some_and(|fired| {
            fired.load(Ordering::Acquire) && fired.swap(false, Ordering::AcqRel)
        })
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
        for (index, slot) in state.deadlines.iter_mut().enumerate() {
            if slot.is_some_and(|d| d <= now) {
                *slot = None;
                // Before the wake-up is posted (module comment).
                shared.fired[index].store(true, Ordering::Release);
                expired.push(index);
            }
        }
        if !expired.is_empty() {
            drop(state);
            for index in expired.drain(..) {
                on_expiry(index);
            }
            state = shared.lock();
            continue;
        }
        let next = state.deadlines.iter().flatten().min().copied();
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
    use std::sync::atomic::AtomicU64;
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
    /// `take_fired`; a cleared one never fires.
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
        assert!(timers.take_fired(0));
        assert!(!timers.take_fired(0), "taken once");
        assert!(!timers.take_fired(1));
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
        assert!(!timers.take_fired(0));
        clock.set(999_999);
        assert!(quiet(&rx), "fired 1 ns early");
        // Nothing tells the thread: it finds VM time there at the end of its own sleep.
        clock.set(5_000_000);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(quiet(&rx), "fired twice, or the cleared deadline fired");
        assert!(timers.take_fired(0));
        assert!(!timers.take_fired(1));
    }

    /// A vCPU that woke for a fired deadline and still sees it ahead arms it again (`run_timer`
    /// after `take_fired`): the same deadline fires again, and an arm forgets an earlier fire.
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
        assert!(!timers.take_fired(0), "the arm forgot the fire");
        clock.set(1_000);
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(timers.take_fired(0));
    }
}
