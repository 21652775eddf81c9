//! The one timer facility of a `user`-mode VM: a single thread holding each vCPU's next APIC
//! timer deadline. When a deadline passes it posts a wake-up to that vCPU's inbox and kicks or
//! wakes it per the returned `Notify`; the vCPU itself then polls its APIC timer model with the VM
//! clock, which sets the vector in IRR. So an expiry reaches a vCPU running in the guest (kick), a
//! halted one (doorbell) and one between the two (it drains before entering).
//!
//! One slot per vCPU (the LAPIC has one timer), armed by the vCPU thread only when its deadline
//! changes; a linear scan of the slots is cheaper than a heap at these vCPU counts.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::seccomp::{Role, ThreadFilter};

struct State {
    deadlines: Vec<Option<Instant>>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
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
    /// Starts the thread, under its seccomp filter if `seccomp`.
    pub fn start(vcpus: usize, on_expiry: OnExpiry, seccomp: bool) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                deadlines: vec![None; vcpus],
                stop: false,
            }),
            changed: Condvar::new(),
        });
        let filter = seccomp
            .then(|| ThreadFilter::new(Role::Timer))
            .transpose()
            .map_err(std::io::Error::other)?;
        let thread = {
            let shared = shared.clone();
            crate::seccomp::spawn("vm-timers".into(), filter, move || run(&shared, on_expiry))
                .map_err(std::io::Error::other)?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Sets (or with `None` clears) vCPU `index`'s deadline.
    pub fn arm(&self, index: usize, deadline: Option<Instant>) {
        let mut state = self.shared.lock();
        if let Some(slot) = state.deadlines.get_mut(index) {
            *slot = deadline;
        }
        drop(state);
        self.shared.changed.notify_one();
    }
}

fn run(shared: &Shared, on_expiry: OnExpiry) {
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
        let now = Instant::now();
        for (index, slot) in state.deadlines.iter_mut().enumerate() {
            if slot.is_some_and(|d| d <= now) {
                *slot = None;
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
            Some(d) => {
                shared
                    .changed
                    .wait_timeout(state, d.saturating_duration_since(now))
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
    use std::sync::mpsc;
    use std::time::Duration;

    /// A deadline in the past fires at once; a cleared one never fires; each fires once.
    #[test]
    fn expired_deadline_fires_once_and_cleared_never() {
        let (tx, rx) = mpsc::channel();
        let timers = VmTimers::start(
            2,
            Box::new(move |i| {
                let _ = tx.send(i);
            }),
            true,
        )
        .unwrap();
        timers.arm(1, Some(Instant::now() + Duration::from_secs(3600)));
        timers.arm(1, None);
        timers.arm(0, Some(Instant::now()));
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(0));
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
    }
}
